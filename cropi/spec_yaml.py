"""Reading job-spec YAML safely (`cropi/spec.py` validates what comes out).

PyYAML's SafeLoader, tightened: anchors, aliases and duplicate keys are
refused with their line, error messages never quote the offending text, and
a spec file must be at most MAX_SPEC_BYTES of UTF-8 text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cropi.errors import InputError

__all__ = ["MAX_SPEC_BYTES", "SpecDumper", "format_validation_error", "line_of", "load_yaml", "read_spec_text"]

MAX_SPEC_BYTES = 1 << 20  # a spec file (the controller API caps its request body the same)


class SpecDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


class _Refused(Exception):
    """YAML that parses but that a spec may not use; the message names the line, never a value."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing what a spec never needs and an attacker can abuse.

    Anchors and aliases are refused: an alias repeats a subtree, so a small body can expand to a
    large spec (each level of nested aliases multiplies it). Duplicate keys are refused (YAML
    forbids them; PyYAML silently keeps the last). `1e-4` and `1.0e5` are floats, as in YAML 1.2
    (YAML 1.1, PyYAML's default, reads them as strings).
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = "an alias (*name)" if isinstance(event, yaml.AliasEvent) else "an anchor (&name)"
            raise _Refused(f"line {event.start_mark.line + 1}: {what}; a job spec may not use YAML anchors or "
                           "aliases, write the value out")
        return super().compose_node(parent, index)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # SafeConstructor raises plain Python errors for some scalars (`!!int abc`, `!!float x`,
        # `!!timestamp x`, an integer of more than 4300 digits), quoting the value: name the line.
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError):
            kind = str(node.tag).rpartition(":")[2] or "scalar"
            raise _Refused(f"line {node.start_mark.line + 1}: not a valid {kind} value") from None


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _refuse_duplicate_keys(loader: _SpecLoader, node: yaml.Node, path: tuple[str, ...] = ()) -> None:
    """Refuse a mapping that repeats a key, naming the key's path and both lines (not the values)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, (*path, str(i)))
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            name = "?"
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(key_node)  # 1 and 01 are one key, as in the loaded dict
                name = str(key)[:80]
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _Refused(f"{'.'.join((*path, name))}: duplicate key (line {line}; first at line "
                                   f"{first_line[key]})")
                first_line[key] = line
            _refuse_duplicate_keys(loader, value_node, (*path, name))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error without PyYAML's excerpt of the offending line (it may hold a secret)."""
    if isinstance(err, yaml.reader.ReaderError):
        char = err.character if isinstance(err.character, int) else ord(err.character)
        return f"unacceptable character #x{char:04x} at position {err.position}: {err.reason}"
    if isinstance(err, yaml.MarkedYAMLError):
        parts = []
        for text, mark in ((err.context, err.context_mark), (err.problem, err.problem_mark)):
            if text:
                parts.append(text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""))
        return "; ".join(parts) or type(err).__name__
    return type(err).__name__


def load_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The document and its node tree (for error lines), parsed once."""
    loader = None
    try:
        loader = _SpecLoader(text)  # its reader refuses control characters right away
        root = loader.get_single_node()
        if root is None:
            return None, None
        _refuse_duplicate_keys(loader, root)
        return loader.construct_document(root), root
    except _Refused as err:
        raise InputError(f"invalid job spec ({source}):\n  {err}") from None
    except yaml.YAMLError as err:
        raise InputError(f"job spec {source} is not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise InputError(f"job spec {source} is not a usable YAML document: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node found along pydantic location `loc`."""
    line = None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def read_spec_text(path: Path) -> str:
    """A spec file's text: at most MAX_SPEC_BYTES of UTF-8, else an InputError naming the file and offset."""
    if not path.is_file():
        raise InputError(f"job spec not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise InputError(f"job spec {path} is {size} bytes; a job spec is at most {MAX_SPEC_BYTES} bytes")
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise InputError(f"cannot read job spec {path}: {err.strerror or type(err).__name__}") from None
    if len(raw) > MAX_SPEC_BYTES:  # it grew since stat
        raise InputError(f"job spec {path} is over {MAX_SPEC_BYTES} bytes; a job spec is at most that")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise InputError(f"job spec {path} is a binary file, not YAML text (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"job spec {path} is not UTF-8 text (invalid byte at offset {err.start})") from None


def format_validation_error(err: ValidationError, source: str = "spec", root: yaml.Node | None = None) -> str:
    lines = [f"invalid job spec ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        where = ""
        line = line_of(root, loc) if root is not None else None
        if line is not None:
            where = f" (line {line})"
        lines.append(f"  {path}: {msg}{where}")
    return "\n".join(lines)

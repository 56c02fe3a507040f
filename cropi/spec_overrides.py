"""`--set a.b=c` on `cropi run|submit|validate`: changes to a spec file's YAML mapping, made
before the spec is validated, so that the spec's own types and bounds judge them.

A value is read as YAML by the spec's own loader (`--set rl.lr=1e-5` is a float,
`--set curriculum.stages=3` an int, `--set rl.lr=` null); a path descends mappings by key and
lists by index (`data.validation.0.size=8`). Errors name the `--set` path and the field,
never the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cropi.errors import InputError
from cropi.spec import JobSpec, load_spec
from cropi.spec_yaml import line_of, load_yaml, read_spec_text

__all__ = ["apply_overrides", "load_spec_with", "parse_override"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], the value read as YAML)."""
    path, eq, raw = text.partition("=")
    where = f"--set {path.strip() or '?'}"
    segments = path.strip().split(".")
    if not eq or any(not s.strip() for s in segments):
        raise InputError(f"{where}: expected PATH=VALUE with a dotted PATH, e.g. --set rl.lr=1e-5")
    try:
        value, _ = load_yaml(raw, where)
    except InputError as err:  # load_yaml's message never quotes the value
        raise InputError(f"{where}: the value is not valid YAML ({str(err).split(':', 1)[-1].strip()})") from None
    return [s.strip() for s in segments], value


def apply_overrides(data: Any, overrides: list[str]) -> tuple[dict, list[str]]:
    """A copy of the spec mapping `data` with each override applied; also the overridden paths."""
    import copy

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("--set: the spec's top level is not a mapping")
    data = copy.deepcopy(data)
    paths = []
    for text in overrides:
        segments, value = parse_override(text)
        where = f"--set {'.'.join(segments)}"
        node: Any = data
        for depth, seg in enumerate(segments):
            last = depth == len(segments) - 1
            here = ".".join(segments[: depth + 1])
            if isinstance(node, list):
                if not seg.isdigit() or int(seg) >= len(node):
                    raise InputError(f"{where}: {'.'.join(segments[:depth]) or 'it'} is a list of {len(node)} "
                                     f"entries; {seg!r} is not an index of one")
                seg = int(seg)
            elif not isinstance(node, dict):
                raise InputError(f"{where}: {'.'.join(segments[:depth])} is not a section (it has no fields)")
            if last:
                node[seg] = value
            else:
                if isinstance(node, dict) and node.get(seg) is None:
                    if segments[depth + 1].isdigit():
                        raise InputError(f"{where}: {here} has no entries to index (write the list in the file)")
                    node[seg] = {}
                node = node[seg]
        paths.append(".".join(segments))
    return data, paths


def _overridden(loc: tuple, paths: list[str]) -> str | None:
    dotted = ".".join(str(p) for p in loc)
    for path in paths:
        if dotted == path or dotted.startswith(path + ".") or path.startswith(dotted + "."):
            return path
    return None


def load_spec_with(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """`load_spec(path)`, with `--set` overrides applied to its mapping before validation."""
    if not overrides:
        return load_spec(path)
    path = Path(path)
    source = str(path)
    data, root = load_yaml(read_spec_text(path), source)
    data, paths = apply_overrides(data, overrides)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid job spec ({source} with --set):"]
        for e in err.errors():
            loc = tuple(e["loc"])
            field = ".".join(str(p) for p in loc) or "<root>"
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            by = _overridden(loc, paths)
            if by is not None:
                if e["type"] == "extra_forbidden":
                    lines.append(f"  --set {by}: unknown field {field}")
                else:
                    lines.append(f"  --set {by}: {msg}" if field == by else f"  --set {by}: {field}: {msg}")
            else:
                line = line_of(root, loc) if root is not None else None
                lines.append(f"  {field}: {msg}" + (f" (line {line})" if line is not None else ""))
        raise InputError("\n".join(lines)) from None

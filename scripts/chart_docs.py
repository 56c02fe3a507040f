"""Render charts/cropi/README.md from the chart's values.yaml, the way helm-docs would.

helm-docs (a Go binary) is not packaged on PyPI, npm or Debian, so this small stand-in follows its
conventions: a `# --` comment block directly above a key documents it (the block runs from the
`# --` line to the key; comment lines above `# --` are section prose and are left out); nested keys
are dotted paths; every leaf value (a scalar, a list, an empty map) gets a row with its type and
default read from the value; a documented map gets a row of its own and its keys still get theirs.
A key without a `# --` comment takes the `description` of its values.schema.json property, if any.

    python scripts/chart_docs.py           # write charts/cropi/README.md
    python scripts/chart_docs.py --check   # exit 1 when the committed README differs from a render
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "cropi"
README = CHART / "README.md"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?:\s|$)")


def comment_descriptions(text: str, values: dict[str, Any]) -> dict[str, str]:
    """{dotted key: its `# --` description} of a values.yaml text (`values`: the same, parsed)."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings the line is inside
    block: list[str] | None = None  # the open `# --` block's lines
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith("--"):
                block = [body[2:].strip()]
            elif block is not None:
                block.append(body)
            continue
        match = _KEY.match(line)
        if not match:
            block = None  # a blank line, a list item, a flow continuation: no key to document
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [match["key"]]
        parent = _lookup(values, path[:-1])
        if isinstance(parent, dict) and match["key"] in parent:  # not a key inside a list item
            if block is not None:
                found[".".join(path)] = " ".join(part for part in block if part)
            stack.append((indent, match["key"]))
        block = None
    return found


def _lookup(values: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(values, dict) or key not in values:
            return None
        values = values[key]
    return values


def leaves(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, bool]]:
    """(key path, value, is_leaf) of every key in file order; maps with keys are not leaves."""
    rows = []
    for key, value in values.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            rows.append((path, value, False))
            rows += leaves(value, path)
        else:
            rows.append((path, value, True))
    return rows


def value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "string"


def schema_descriptions(schema: dict[str, Any]) -> dict[str, str]:
    """{dotted key: description} of the schema's properties ($refs to definitions followed)."""
    found: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        node = resolve(schema, node)
        for key, sub in (node.get("properties") or {}).items():
            path = f"{prefix}{key}"
            described = sub.get("description") or resolve(schema, sub).get("description")
            if described:
                found[path] = described
            walk(sub, path + ".")

    walk(schema, "")
    return found


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    comments = comment_descriptions(text, values)
    from_schema = schema_descriptions(json.loads((CHART / "values.schema.json").read_text()))
    lines = [
        f"# {chart['name']}",
        "",
        f"![Version: {chart['version']}](https://img.shields.io/badge/Version-{chart['version']}-informational)"
        f" ![AppVersion: {chart['appVersion']}](https://img.shields.io/badge/AppVersion-{chart['appVersion']}-informational)",
        "",
        chart["description"],
        "",
        "<!-- Generated from values.yaml by scripts/chart_docs.py (helm-docs conventions); do not edit by hand:",
        "     run `python scripts/chart_docs.py` after changing values.yaml (tests/test_chart_docs.py checks). -->",
        "",
        "An install walk-through, the presets (`values-gpu-small.yaml`, `values-7b.yaml`,",
        "`values-external.yaml`) and what each part does: [docs/kubernetes.md](../../docs/kubernetes.md).",
        "Every key below is checked by `values.schema.json`: a misspelt key is an error, not a default.",
        f"The chart needs Kubernetes `{chart.get('kubeVersion', '')}` and the KubeRay operator.",
        "",
        "## Values",
        "",
        "| Key | Type | Default | Description |",
        "|-----|------|---------|-------------|",
    ]
    for keys, value, is_leaf in leaves(values):
        path = ".".join(keys)
        description = comments.get(path) or from_schema.get(path, "")
        if not is_leaf and not description:
            continue  # an undocumented map: its keys' rows say it all
        default = f"`{json.dumps(value, separators=(', ', ': '))}`" if is_leaf else "(the keys below)"
        lines.append(f"| {path} | {value_type(value)} | {_cell(default)} | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the README is not a fresh render")
    args = parser.parse_args(argv)
    fresh = render()
    if args.check:
        if not README.exists() or README.read_text() != fresh:
            print(f"{README.relative_to(ROOT)} is stale: run python scripts/chart_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())

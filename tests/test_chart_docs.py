"""The chart's documentation and schema cannot drift from values.yaml: charts/cropi/README.md is
what scripts/chart_docs.py renders from it now, every key of values.yaml is declared in the
hand-written values.schema.json and every schema property is a key of values.yaml, and the defaults
pass the schema."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "cropi"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())

# Schema properties that values.yaml leaves out on purpose ((key path): why). None today: every
# optional setting has a default in values.yaml, so that the README lists it.
SCHEMA_ONLY: dict[tuple[str, ...], str] = {}


def _chart_docs():
    spec = importlib.util.spec_from_file_location("chart_docs", ROOT / "scripts" / "chart_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chart_docs = _chart_docs()


def _schema_at(path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema of the value at `path` (properties, then a map's additionalProperties), or None."""
    node = SCHEMA
    for key in path:
        node = chart_docs.resolve(SCHEMA, node)
        if key in (node.get("properties") or {}):
            node = node["properties"][key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return chart_docs.resolve(SCHEMA, node)


def _schema_properties(node: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    node = chart_docs.resolve(SCHEMA, node)
    found = []
    for key, sub in (node.get("properties") or {}).items():
        found.append((*prefix, key))
        found += _schema_properties(sub, (*prefix, key))
    return found


def test_the_committed_chart_readme_is_a_fresh_render_of_values_yaml():
    committed = (CHART / "README.md").read_text()
    assert committed == chart_docs.render(), "charts/cropi/README.md is stale: run python scripts/chart_docs.py"
    assert chart_docs.main(["--check"]) == 0


def test_the_readme_documents_every_key_with_its_comment_type_and_default():
    readme = chart_docs.render()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in readme.splitlines() if line.startswith("| ")}
    for keys, value, is_leaf in chart_docs.leaves(VALUES):
        if is_leaf:
            assert ".".join(keys) in rows, keys
    row = rows["objectStore.external.credentials"]
    assert "| string | `\"static\"` |" in row and "AWS credential chain" in row
    assert "| list | `[]` |" in rows["extraVolumeMounts"]
    assert "| int | `15` |" in rows["controller.leaseTtlSeconds"]
    assert "| bool | `true` |" in rows["ray.enabled"]
    # No `# --` comment: the schema's description stands in.
    assert rows["controller.ingress.path"].endswith("| HTTP path, absolute |")
    # Section prose above a `# --` block is not part of the key's description.
    assert "Generated secrets" not in rows["auth.existingSecret"]


def test_comment_blocks_follow_helm_docs_conventions():
    text = """# a section comment, not documentation
top:
  # prose
  # -- The first line.
  # and its continuation.
  child: 1
  undocumented: x
  list:
    - name: inside
      nested: 2
# -- A map documented as a whole.
other: {a: 1}
"""
    found = chart_docs.comment_descriptions(text, yaml.safe_load(text))
    assert found == {"top.child": "The first line. and its continuation.", "other": "A map documented as a whole."}


def test_every_key_of_values_yaml_is_declared_in_the_schema():
    undeclared = [keys for keys, _, _ in chart_docs.leaves(VALUES) if _schema_at(keys) is None]
    assert undeclared == []


def test_every_schema_property_is_a_key_of_values_yaml():
    keys = {k for k, _, _ in chart_docs.leaves(VALUES)}
    missing = [p for p in _schema_properties(SCHEMA) if p not in keys and p not in SCHEMA_ONLY]
    assert missing == []
    assert all(p not in keys for p in SCHEMA_ONLY), "an exception that is no longer one"


def test_the_defaults_pass_the_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(VALUES)]
    assert errors == []


def test_charts_readme_points_to_the_generated_one():
    assert "cropi/README.md" in (ROOT / "charts" / "README.md").read_text()

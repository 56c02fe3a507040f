"""Kubernetes CRD schema helpers for tests: a structural-schema checker and a
jsonschema adapter.

No API server can run on the development machines, so these stand in for the
two things it would do with a CRD: refuse a non-structural schema, and
validate (and default) custom resources against it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

#: KubeRay's real CRDs, beside the project on the development machines.
KUBERAY_CRDS = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"

# Keywords an API server refuses in a structural schema, whatever their value.
_FORBIDDEN = {"$ref", "$schema", "$defs", "definitions", "id", "const", "patternProperties",
              "dependencies", "additionalItems"}
# Inside anyOf/allOf/oneOf/not only value validations are allowed, never the shape.
_SHAPE = {"type", "description", "default", "nullable", "additionalProperties", "title",
          "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource"}
_JUNCTORS = ("anyOf", "allOf", "oneOf")


def _children(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, sub in (node.get("properties") or {}).items():
        yield f"{path}.{name}", sub
    if isinstance(node.get("additionalProperties"), dict):
        yield f"{path}.*", node["additionalProperties"]
    if isinstance(node.get("items"), dict):
        yield f"{path}[]", node["items"]


def _value_validation_violations(node: dict[str, Any], path: str) -> list[str]:
    found = [f"{path}: {key!r} inside a value validation" for key in sorted(_SHAPE & node.keys())]
    for junctor in _JUNCTORS:
        for i, sub in enumerate(node.get(junctor, [])):
            found += _value_validation_violations(sub, f"{path}.{junctor}[{i}]")
    if "not" in node:
        found += _value_validation_violations(node["not"], f"{path}.not")
    return found


def structural_violations(schema: dict[str, Any], path: str = "") -> list[str]:
    """Reasons `schema` is not a Kubernetes structural schema (empty when it is), each naming its path."""
    found: list[str] = []
    loose = schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string")
    for key in sorted(_FORBIDDEN & schema.keys()):
        found.append(f"{path or '<root>'}: forbidden keyword {key!r}")
    if not schema.get("type") and not loose:
        found.append(f"{path or '<root>'}: no type")
    if schema.get("additionalProperties") is False:
        found.append(f"{path}: additionalProperties: false is forbidden")
    if schema.get("uniqueItems") is True:
        found.append(f"{path}: uniqueItems: true is forbidden")
    if "default" in schema and schema["default"] is None:
        found.append(f"{path}: null default")
    if schema.get("type") == "object":
        has_props, has_additional = "properties" in schema, isinstance(schema.get("additionalProperties"), dict)
        if has_props and has_additional:
            found.append(f"{path}: both properties and additionalProperties")
        if not (has_props or has_additional or loose or path == ".metadata"):
            found.append(f"{path}: object without properties or additionalProperties")
    if schema.get("type") == "array" and "items" not in schema:
        found.append(f"{path}: array without items")
    for junctor in _JUNCTORS:
        for i, sub in enumerate(schema.get(junctor, [])):
            found += _value_validation_violations(sub, f"{path}.{junctor}[{i}]")
    if "not" in schema:
        found += _value_validation_violations(schema["not"], f"{path}.not")
    for sub_path, sub in _children(schema, path):
        found += structural_violations(sub, sub_path)
    return found


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema as a draft 2020-12 JSON schema that checks a resource as `kubectl apply` would.

    `nullable` becomes a `null` type, OpenAPI v3.0 boolean exclusive bounds become numeric ones,
    and objects with declared properties refuse unknown fields (strict server-side field
    validation, kubectl's default since Kubernetes 1.27)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("nullable"):
        out["type"] = [schema["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    for bound in ("minimum", "maximum"):
        flag = "exclusive" + bound[0].upper() + bound[1:]
        if out.get(flag) is True:
            out[flag] = out.pop(bound)
        elif out.get(flag) is False:
            del out[flag]
    if "properties" in schema:
        out["properties"] = {k: to_jsonschema(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        out["items"] = to_jsonschema(schema["items"])
    return out


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """`value` with the schema's defaults filled in, as the API server does: a missing property
    takes its default, then defaulting descends into every present object and list item."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(v, schema["items"]) for v in value]
    return value


def defaults(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(path, default, schema) of every default in a structural schema."""
    if "default" in schema:
        yield path, schema["default"], schema
    for sub_path, sub in _children(schema, path):
        yield from defaults(sub, sub_path)


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    """KubeRay's schema of `kind`, parsed once (its CRD files are about 1 MB each)."""
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not present at {KUBERAY_CRDS} (reference data of the dev machines)")
    crd = yaml.safe_load((KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)

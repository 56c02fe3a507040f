"""The `CurriculumJob` CustomResourceDefinition, generated from the job-spec model.

A CurriculumJob's `.spec` is a job spec (docs/design.md §3). Its openAPIV3Schema is
derived from `cropi.spec.JobSpec` rather than written by hand, so the CRD and
the controller API cannot disagree; `tests/test_crd.py` fails when the
committed chart file drifts from the model. Regenerate with

    python -m cropi.crd > charts/cropi/crds/curriculumjob.yaml

Kubernetes only accepts *structural* schemas: no `$ref`, a `type` on every
node, nullability as `nullable: true`, OpenAPI v3.0 boolean exclusive bounds,
and no `additionalProperties: false`. Unknown fields are therefore not refused
by the schema but pruned by the API server, and `kubectl apply` (strict
server-side field validation, the default since Kubernetes 1.27) reports them
as errors - the same strictness the controller API gets from the model's
`extra="forbid"`.

The job name is the resource's `metadata.name`; `spec.name` is optional in the
CRD and `job_spec_of` fills it in.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from cropi.errors import InputError
from cropi.spec import JobSpec, parse_spec

GROUP = "cropi.dev"
VERSION = "v1alpha1"
KIND = "CurriculumJob"
PLURAL = "curriculumjobs"
REGENERATE = "python -m cropi.crd > charts/cropi/crds/curriculumjob.yaml"

# JSON-schema keywords that mean the same in a Kubernetes structural schema.
_KEPT = {"type", "description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
         "format", "required", "minItems", "maxItems", "nullable"}


def _strip_nulls(value: Any) -> Any:
    # In a default, a null member means "absent"; Kubernetes would store it as an explicit null.
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _exclusive_bound(out: dict[str, Any], bound: str, value: Any, path: str) -> None:
    # JSON Schema 2020 writes `exclusiveMinimum: 0`; OpenAPI v3.0 (Kubernetes) writes
    # `minimum: 0, exclusiveMinimum: true`.
    if bound in out:
        raise ValueError(f"{path}: both an inclusive and an exclusive {bound} cannot be expressed in a CRD")
    out[bound] = value
    out["exclusive" + bound[0].upper() + bound[1:]] = True


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        # Siblings of a $ref (default, description) override the referenced definition's.
        return _convert({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs, path)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1 or len(variants) == len(node["anyOf"]):
            raise ValueError(f"{path}: only `X | None` unions can be expressed in a structural schema")
        merged = {**variants[0], **{k: v for k, v in node.items() if k != "anyOf"}, "nullable": True}
        return _convert(merged, defs, path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue  # pydantic's titles only repeat the field name
        if key == "properties":
            out[key] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if value is not False:  # `false` is forbidden; the API server prunes unknown fields instead
                out[key] = _convert(value, defs, f"{path}.*")
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            _exclusive_bound(out, "minimum", value, path)
        elif key == "exclusiveMaximum":
            _exclusive_bound(out, "maximum", value, path)
        elif key == "default":
            if value is not None:
                out[key] = _strip_nulls(value)
        elif key in _KEPT:
            if key in ("minimum", "maximum") and key in out:
                raise ValueError(f"{path}: both an inclusive and an exclusive {key} cannot be expressed in a CRD")
            out[key] = value
        else:
            raise ValueError(f"{path}: JSON-schema keyword {key!r} has no Kubernetes structural-schema equivalent")
    return out


def structural_schema(model_schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic `model_json_schema()` as a Kubernetes structural schema; ValueError naming the
    field path for constructs Kubernetes cannot express (unions other than `X | None`, ...)."""
    defs = model_schema.get("$defs", {})
    return _convert({k: v for k, v in model_schema.items() if k != "$defs"}, defs, "spec")


def spec_schema() -> dict[str, Any]:
    """The schema of a CurriculumJob's `.spec`."""
    schema = structural_schema(JobSpec.model_json_schema())
    name = schema["properties"]["name"]
    # A default here would be written into every resource and hide metadata.name.
    name.pop("default", None)
    name["description"] = "job name; defaults to metadata.name (a DNS label)"
    return schema


def _condition_schema() -> dict[str, Any]:
    # metav1.Condition, the standard Kubernetes condition shape.
    return {
        "type": "object",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": {"type": "string", "maxLength": 316,
                     "description": "condition type in CamelCase, e.g. Submitted, Ready, Succeeded"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "reason": {"type": "string", "minLength": 1, "maxLength": 1024,
                       "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
            "message": {"type": "string", "maxLength": 32768},
        },
    }


def status_schema() -> dict[str, Any]:
    """The schema of `.status`, which the operator mirrors from the controller."""
    return {
        "type": "object",
        "properties": {
            "phase": {"type": "string",
                      "description": "Queued, Running, Succeeded, Failed, Cancelled; Invalid (spec refused), "
                                     "Conflict (name taken), Unknown (the controller lost the job); the "
                                     "controller's own phase is in message"},
            "stage": {"type": "integer", "minimum": 0, "description": "current curriculum stage"},
            "step": {"type": "integer", "minimum": 0, "description": "GRPO steps trained so far"},
            "metrics": {"type": "object", "additionalProperties": {"type": "number"},
                        "description": "latest evaluation metrics by name"},
            "message": {"type": "string", "description": "human-readable detail, e.g. the error of a failed job"},
            "conditions": {"type": "array", "items": _condition_schema(),
                           "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0,
                                   "description": "metadata.generation the operator last acted on"},
            "controllerJob": {"type": "string", "description": "name of the job submitted to the controller"},
        },
    }


def curriculumjob_crd() -> dict[str, Any]:
    """The complete apiextensions.k8s.io/v1 CustomResourceDefinition of CurriculumJob."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "cropi"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": "curriculumjob",
                      "shortNames": ["cj"], "categories": ["cropi"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Stage", "type": "integer", "jsonPath": ".status.stage"},
                    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A curriculum RL job (CROPI); .spec is a cropi job spec.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML committed to the chart."""
    header = f"# Generated from cropi.spec.JobSpec by cropi/crd.py; do not edit. Regenerate:\n#   {REGENERATE}\n"
    return header + yaml.safe_dump(curriculumjob_crd(), sort_keys=False, width=120)


def job_spec_of(resource: dict[str, Any]) -> JobSpec:
    """The job spec of a CurriculumJob resource: `.spec`, named after metadata.name.

    Raises InputError (naming the field) for a spec the model refuses, or a
    spec.name that differs from metadata.name (the job would not be the object's)."""
    meta = resource["metadata"]
    name = meta["name"]
    given = resource.get("spec") or {}
    if given.get("name", name) != name:
        raise InputError(f"invalid job spec ({KIND} {name} .spec):\n  name: {given['name']!r} differs from "
                         f"metadata.name {name!r}; leave spec.name out (it defaults to metadata.name)")
    spec = {**given, "name": name}  # a new dict: the resource is not changed
    where = f"{meta['namespace']}/{name}" if meta.get("namespace") else name
    return parse_spec(spec, f"{KIND} {where} .spec")


if __name__ == "__main__":
    sys.stdout.write(render_crd())

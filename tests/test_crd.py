"""The CurriculumJob CRD: generated from the job-spec model, committed to the chart, valid and structural.

No Kubernetes API server can run on the development machines: the CRD is checked
with kubernetes-validate (the apiextensions.k8s.io/v1 OpenAPI schemas of
Kubernetes 1.29-1.33), a structural-schema checker, and jsonschema standing in
for the API server's validation of resources (tests/k8s_schema.py).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, Field

from cropi.crd import (
    REGENERATE,
    curriculumjob_crd,
    job_spec_of,
    render_crd,
    spec_schema,
    structural_schema,
)
from cropi.errors import InputError
from cropi.spec import JobSpec, load_spec
from tests.k8s_schema import (
    apply_defaults,
    defaults,
    structural_violations,
    to_jsonschema,
)

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "charts/cropi/crds/curriculumjob.yaml"
EXAMPLES = [ROOT / "examples/curriculumjob.yaml", ROOT / "examples/curriculumjob-ray.yaml"]
K8S_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]


def _openapi(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(to_jsonschema(_openapi(curriculumjob_crd())))


def _errors(resource: dict[str, Any]) -> list[str]:
    return sorted(".".join(str(p) for p in e.absolute_path) + ": " + e.message
                  for e in _validator().iter_errors(resource))


def _example(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


# --- the committed file -------------------------------------------------------------------------


def test_committed_crd_matches_the_job_spec_model() -> None:
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; generate it with: {REGENERATE}"
    assert COMMITTED.read_text() == render_crd(), (
        f"{COMMITTED.relative_to(ROOT)} has drifted from cropi.spec.JobSpec; regenerate it with: {REGENERATE}")


def test_module_entry_point_prints_the_crd() -> None:
    out = subprocess.run([sys.executable, "-m", "cropi.crd"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == render_crd()


# --- a valid CRD --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_a_valid_apiextensions_v1_object(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(COMMITTED.read_text()), version, strict=True)


def test_kubernetes_validate_refuses_a_misspelt_crd_field() -> None:
    crd = curriculumjob_crd()
    crd["spec"]["versions"][0]["servedd"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="servedd"):
        kubernetes_validate.validate(crd, "1.33", strict=True)


def test_crd_names_status_subresource_and_printer_columns() -> None:
    crd = curriculumjob_crd()
    assert crd["metadata"]["name"] == "curriculumjobs.cropi.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["cj"]
    version = crd["spec"]["versions"][0]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Stage", "Step", "Age"]


# --- a structural schema -------------------------------------------------------------------------


def test_crd_schema_is_structural() -> None:
    assert structural_violations(_openapi(curriculumjob_crd())) == []


def test_raw_pydantic_schema_is_not_structural() -> None:
    # The checker itself: pydantic's own schema has $ref, anyOf-with-null and additionalProperties: false.
    found = "\n".join(structural_violations(JobSpec.model_json_schema()))
    assert "'$ref'" in found and "additionalProperties: false" in found and "no type" in found


def test_spec_schema_covers_every_field_of_the_model() -> None:
    schema = spec_schema()
    assert set(schema["properties"]) == set(JobSpec.model_fields)
    assert set(schema["properties"]["ray"]["properties"]) == set(JobSpec.model_fields["ray"].annotation.model_fields)


def test_numeric_bounds_use_openapi_v3_exclusive_flags() -> None:
    stages = spec_schema()["properties"]["curriculum"]["properties"]["stages"]
    assert (stages["type"], stages["minimum"], stages["exclusiveMinimum"]) == ("integer", 0, True)
    momentum = spec_schema()["properties"]["rl"]["properties"]["momentum"]
    assert (momentum["minimum"], momentum["maximum"], momentum["exclusiveMaximum"]) == (0, 1, True)
    assert "exclusiveMinimum" not in momentum


def test_optional_fields_are_nullable_without_a_null_default() -> None:
    size = spec_schema()["properties"]["data"]["properties"]["pool"]["properties"]["size"]
    assert size == {"description": size["description"], "type": "integer", "minimum": 0, "exclusiveMinimum": True,
                    "nullable": True}


def test_spec_name_is_optional_and_has_no_default() -> None:
    name = spec_schema()["properties"]["name"]
    assert "default" not in name and "name" not in spec_schema().get("required", [])


def test_unions_kubernetes_cannot_express_are_refused_naming_the_field() -> None:
    class Odd(BaseModel):
        size: int | str = Field(1)

    with pytest.raises(ValueError, match=r"spec\.size"):
        structural_schema(Odd.model_json_schema())


# --- defaults --------------------------------------------------------------------------------------


def test_every_default_is_valid_under_its_own_schema() -> None:
    found = list(defaults(spec_schema(), "spec"))
    assert len(found) > 50
    for path, value, schema in found:
        errors = [e.message for e in jsonschema.Draft202012Validator(to_jsonschema(schema)).iter_errors(value)]
        assert errors == [], f"{path}: default {value!r} is invalid: {errors}"


def test_kubernetes_defaulting_of_an_empty_spec_gives_the_models_defaults() -> None:
    defaulted = apply_defaults({"name": "x"}, spec_schema())
    model = JobSpec(name="x").model_dump(mode="json")
    assert JobSpec.model_validate(defaulted) == JobSpec.model_validate(model)


# --- resources against the CRD ----------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_curriculumjobs_validate_and_parse(path: Path) -> None:
    resource = _example(path)
    assert _errors(resource) == []
    spec = job_spec_of(resource)
    assert spec.name == resource["metadata"]["name"]


def test_plain_example_is_the_demo_job() -> None:
    resource = _example(EXAMPLES[0])
    demo = load_spec(ROOT / "examples/arith.yaml")
    assert job_spec_of(resource) == demo


def test_ray_example_uses_the_ray_executor() -> None:
    assert job_spec_of(_example(EXAMPLES[1])).executor == "ray"


def test_kubernetes_defaults_of_an_example_parse_to_the_same_job() -> None:
    # What the operator reads back from the API server has every default filled in.
    resource = _example(EXAMPLES[1])
    stored = dict(resource, spec=apply_defaults(resource["spec"], spec_schema()))
    assert job_spec_of(stored) == job_spec_of(resource)


def test_negative_steps_are_refused_naming_the_field() -> None:
    resource = _example(EXAMPLES[0])
    resource["spec"]["curriculum"]["steps_per_stage"] = -5
    errors = _errors(resource)
    assert len(errors) == 1 and errors[0].startswith("spec.curriculum.steps_per_stage: -5 is less than")


def test_unknown_selector_is_refused_naming_the_field() -> None:
    resource = _example(EXAMPLES[0])
    resource["spec"]["curriculum"]["selector"] = "best"
    errors = _errors(resource)
    assert len(errors) == 1 and errors[0].startswith("spec.curriculum.selector: 'best' is not one of")


def test_unknown_spec_field_is_refused_naming_it() -> None:
    resource = _example(EXAMPLES[0])
    resource["spec"]["rl"]["learning_rate"] = 0.1
    assert any(e.startswith("spec.rl:") and "learning_rate" in e for e in _errors(resource))


def test_a_resource_without_spec_is_refused() -> None:
    resource = copy.deepcopy(_example(EXAMPLES[0]))
    del resource["spec"]
    assert _errors(resource) == [": 'spec' is a required property"]


def test_status_accepts_the_operators_mirror_and_refuses_a_bad_condition() -> None:
    resource = _example(EXAMPLES[0])
    resource["status"] = {
        "phase": "train", "stage": 1, "step": 52, "metrics": {"acc/add2": 0.41}, "message": "",
        "observedGeneration": 1, "controllerJob": "arith-demo",
        "conditions": [{"type": "Submitted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1}],
    }
    assert _errors(resource) == []
    resource["status"]["conditions"][0]["status"] = "yes"
    assert [e.split(":")[0] for e in _errors(resource)] == ["status.conditions.0.status"]


def test_job_spec_of_reports_model_errors_with_the_field_path() -> None:
    resource = _example(EXAMPLES[0])
    resource["spec"]["data"]["validation"][0]["name"] = "bad name"
    with pytest.raises(InputError, match=r"data\.validation\.0\.name"):
        job_spec_of(resource)

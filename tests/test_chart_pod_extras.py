"""Issue I part 4 in the chart: extra env, volumes and mounts for the cropi pods (top level for all,
and each pod's own), the pods' ServiceAccount (IRSA / Workload Identity annotations), and an
external S3 reached with the AWS credential chain instead of static keys. Rendered by real Helm,
checked against the Kubernetes schemas (kubernetes-validate) and KubeRay's CRDs."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from helm_python.errors import HelmError

from tests.helm_render import preset_values, render_chart
from tests.k8s_schema import kuberay_validator

CROPI_PODS = ("controller", "rollout", "projector", "trainer", "ray-head", "ray-projector", "ray-trainer")
DATA = {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}
EXTRAS = {
    "extraEnv": [{"name": "HF_HOME", "value": "/data/hf"}, {"name": "SHARED", "value": "top"}],
    "extraVolumes": [DATA],
    "extraVolumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
    "controller": {"dataRoots": ["/data"], "extraEnv": [{"name": "SHARED", "value": "controller"}]},
    "workers": {"trainer": {"extraVolumeMounts": [{"name": "datasets", "mountPath": "/data"}],
                            "extraVolumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}],
                            "extraEnv": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]}},
    "ray": {"head": {"extraEnv": [{"name": "HEAD_ONLY", "value": "1"}]},
            "trainer": {"extraVolumeMounts": [{"name": "datasets", "mountPath": "/mnt/more", "subPath": "more"}]}},
}


def _pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod templates by component label."""
    found = {}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            templates = [obj["spec"]["template"]]
        elif obj["kind"] in ("RayCluster", "RayService"):
            spec = obj["spec"].get("rayClusterConfig", obj["spec"])
            templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
        else:
            continue
        found.update({t["metadata"]["labels"]["app.kubernetes.io/component"]: t for t in templates})
    return found


def _env(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}


def _mounts(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}


def _volumes(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in template["spec"]["volumes"]}


def _assert_valid(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            kuberay_validator(obj["kind"]).validate({k: v for k, v in obj.items() if k != "metadata"})
        else:
            for version in ("1.29", "1.33"):
                kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("rollout_service", [False, True], ids=["raycluster", "rayservice"])
def test_extras_reach_every_cropi_pod_and_the_objects_stay_valid(rollout_service):
    objects = render_chart({**EXTRAS, "ray": {**EXTRAS["ray"], "rolloutService": {"enabled": rollout_service}}})
    _assert_valid(objects)
    pods = _pods(objects)
    for component in CROPI_PODS:
        pod = pods[component]
        assert _env(pod)["HF_HOME"]["value"] == "/data/hf", component
        assert _volumes(pod)["datasets"] == DATA, component
        assert _mounts(pod)["/data"]["name"] == "datasets", component
        # The chart's own entries stay, before the user's.
        assert {"/tmp"} <= set(_mounts(pod)) and "tmp" in _volumes(pod), component
    for component in ("operator", "redis", "minio", "minio-setup"):
        assert "datasets" not in _volumes(pods[component]) and "HF_HOME" not in _env(pods[component]), component


def test_a_pods_own_entry_replaces_the_top_level_one_with_the_same_key():
    pods = _pods(render_chart(EXTRAS))
    assert _env(pods["controller"])["SHARED"]["value"] == "controller"
    assert [e["name"] for e in pods["controller"]["spec"]["containers"][0]["env"]].count("SHARED") == 1
    assert _env(pods["rollout"])["SHARED"]["value"] == "top"
    assert "readOnly" not in _mounts(pods["trainer"])["/data"]  # the trainer's own mount of /data
    assert _mounts(pods["rollout"])["/data"]["readOnly"] is True
    assert set(_volumes(pods["trainer"])) == {"tmp", "dshm", "datasets", "scratch"}
    assert "scratch" not in _volumes(pods["projector"])
    assert _env(pods["trainer"])["TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "t", "key": "k"}}
    assert "HEAD_ONLY" in _env(pods["ray-head"]) and "HEAD_ONLY" not in _env(pods["ray-trainer"])
    assert set(_mounts(pods["ray-trainer"])) == {"/tmp", "/dev/shm", "/data", "/mnt/more"}
    env = pods["controller"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env].index("CROPI_STORE") < [e["name"] for e in env].index("HF_HOME")


def test_without_extras_the_pods_have_only_the_charts_own_volumes():
    pods = _pods(render_chart())
    assert set(_volumes(pods["controller"])) == {"tmp", "operator-token"}
    assert set(_volumes(pods["trainer"])) == set(_volumes(pods["ray-trainer"])) == {"tmp", "dshm"}


@pytest.mark.parametrize(("values", "names"), [
    ({"extraEnv": [{"name": "CROPI_STORE", "value": "s3://other"}]}, ["extraEnv", "name"]),
    ({"controller": {"extraEnv": [{"name": "RAY_AUTH_TOKEN", "value": "x"}]}}, ["controller", "extraEnv"]),
    ({"extraEnv": [{"value": "no name"}]}, ["extraEnv", "name"]),
    ({"extraEnv": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
     ["extraEnv"]),
    ({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, ["extraVolumes", "name"]),
    ({"extraVolumes": [{"name": "data"}]}, ["extraVolumes"]),  # no volume source
    ({"extraVolumes": [{"name": "d", "emptyDir": {}, "hostPath": {"path": "/x"}}]}, ["extraVolumes"]),
    ({"extraVolumes": [{"name": "d", "emptyDirr": {}}]}, ["extraVolumes", "emptyDirr"]),
    ({"extraVolumeMounts": [{"name": "d", "mountPath": "/tmp"}]}, ["extraVolumeMounts", "mountPath"]),
    ({"extraVolumeMounts": [{"name": "d", "mountPath": "/var/run/cropi/operator"}]}, ["extraVolumeMounts"]),
    ({"workers": {"rollout": {"extraVolumeMounts": [{"name": "d", "mountPath": "data"}]}}},
     ["workers", "rollout", "extraVolumeMounts"]),
    ({"ray": {"trainer": {"extraVolumeMounts": [{"name": "d"}]}}}, ["ray", "trainer", "mountPath"]),
    ({"serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": 1}}},
     ["serviceAccount", "annotations"]),
    ({"objectStore": {"external": {"credentials": "irsa"}}}, ["objectStore", "external", "credentials"]),
])
def test_the_schema_refuses_extras_that_would_break_a_pod(values, names):
    with pytest.raises(HelmError) as err:
        render_chart(values)
    assert all(name in str(err.value) for name in names), str(err.value)


IRSA = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/cropi"}


def test_a_created_service_account_carries_the_annotations_and_runs_every_cropi_pod():
    objects = render_chart({"serviceAccount": {"create": True, "annotations": IRSA}})
    _assert_valid(objects)
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount" and
                  o["metadata"]["labels"]["app.kubernetes.io/component"] == "workload"]
    assert (account["metadata"]["name"], account["metadata"]["annotations"]) == ("demo-cropi-workload", IRSA)
    assert account["automountServiceAccountToken"] is False
    pods = _pods(objects)
    for component in CROPI_PODS:
        spec = pods[component]["spec"]
        assert spec["serviceAccountName"] == "demo-cropi-workload", component
        assert spec["automountServiceAccountToken"] is False, component  # IRSA projects its own token
    assert pods["operator"]["spec"]["serviceAccountName"] == "demo-cropi-operator"
    assert all("serviceAccountName" not in pods[c]["spec"] for c in ("redis", "minio", "minio-setup"))


def test_an_existing_service_account_is_used_by_name_and_none_is_the_default():
    objects = render_chart({"serviceAccount": {"name": "ml-reader"}})
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"] == ["demo-cropi-operator"]
    assert {_pods(objects)[c]["spec"]["serviceAccountName"] for c in CROPI_PODS} == {"ml-reader"}
    named = render_chart({"serviceAccount": {"create": True, "name": "cropi-irsa"}})
    assert {_pods(named)[c]["spec"]["serviceAccountName"] for c in CROPI_PODS} == {"cropi-irsa"}
    assert all("serviceAccountName" not in _pods(render_chart())[c]["spec"] for c in CROPI_PODS)


def _external_chain(**extra) -> dict[str, Any]:
    values = preset_values("external")
    external = {k: v for k, v in values["objectStore"]["external"].items() if k != "existingSecret"}
    return {**values, **extra, "objectStore": {**values["objectStore"], "external": {**external,
                                                                                   "credentials": "chain"}}}


@pytest.mark.parametrize("rollout_service", [False, True], ids=["raycluster", "rayservice"])
def test_with_the_credential_chain_no_pod_gets_static_keys_but_every_one_finds_the_store(rollout_service):
    values = _external_chain(serviceAccount={"create": True, "annotations": IRSA})
    values["ray"] = {**values["ray"], "rolloutService": {"enabled": rollout_service}}
    objects = render_chart(values)
    _assert_valid(objects)
    pods = _pods(objects)
    readers = ["controller", "rollout", "projector", "trainer"] + (["ray-head"] if rollout_service else [])
    for component in readers:
        env = _env(pods[component])
        assert env["CROPI_STORE"]["value"] == "s3://ml-cropi/prod", component
        assert env["CROPI_S3_ENDPOINT"]["value"] == "s3.eu-west-1.amazonaws.com:443", component
    for component, pod in pods.items():
        assert not {"CROPI_S3_ACCESS_KEY", "CROPI_S3_SECRET_KEY"} & set(_env(pod)), component


def test_static_credentials_still_need_the_secret_and_still_use_it():
    with pytest.raises(HelmError, match="existingSecret"):
        render_chart({"objectStore": {"minio": {"enabled": False}, "external": {"endpoint": "s3.example:443"}}})
    pods = _pods(render_chart(preset_values("external")))
    assert _env(pods["trainer"])["CROPI_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cropi-s3"

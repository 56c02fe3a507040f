"""The Helm chart charts/cropi, rendered with real Helm (helm-python-sdk, offline: no cluster runs
here, so `lookup` finds no live Secret and the chart generates fresh ones).

Built-in objects are checked against the Kubernetes OpenAPI schemas of 1.29-1.33
(kubernetes-validate, strict), KubeRay objects against KubeRay's own CRD schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, lint
from helm_python.errors import HelmError

from tests.k8s_schema import to_jsonschema

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "cropi"
KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay-crds"
K8S_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
PRESETS = {"default": None, "7b": "values-7b.yaml", "gpu-small": "values-gpu-small.yaml",
           "external": "values-external.yaml"}


def _values(preset: str) -> dict[str, Any]:
    file = PRESETS[preset]
    return yaml.safe_load((CHART / file).read_text()) if file else {}


@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict[str, Any]]]:
    """Every preset's objects, rendered once for the module."""
    out = {}
    for preset in PRESETS:
        manifests = chart.render(values=_values(preset), name="demo", namespace="ml")
        out[preset] = [doc for path, text in manifests.items() if path.endswith(".yaml")
                       for doc in yaml.safe_load_all(text) if doc]
    return out


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] in ("RayCluster", "RayService"):
        cluster = obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else obj["spec"]
        return [cluster["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    return []


@pytest.mark.parametrize("preset", PRESETS)
def test_chart_lints_clean_in_strict_mode(preset):
    report = lint(CHART, _values(preset), strict=True, namespace="ml")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("preset", PRESETS)
def test_every_builtin_object_is_valid_for_kubernetes_1_29_to_1_33(rendered, preset):
    builtin = [o for o in rendered[preset] if not o["apiVersion"].startswith("ray.io/")]
    assert {"Deployment", "Service", "NetworkPolicy"} <= {o["kind"] for o in builtin}
    for obj in builtin:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def _kuberay_schema(kind: str) -> dict[str, Any]:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not present at {KUBERAY_CRDS} (reference data of the dev machines)")
    crd = yaml.safe_load((KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return to_jsonschema(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("preset", PRESETS)
def test_ray_objects_are_accepted_by_kuberay_crd_schemas(rendered, preset):
    ray_objects = [o for o in rendered[preset] if o["apiVersion"] == "ray.io/v1"]
    assert _of_kind(ray_objects, "RayCluster"), "every preset runs the Ray cluster"
    for obj in ray_objects:
        body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata is the API server's, not the CRD's
        jsonschema.validate(body, _kuberay_schema(obj["kind"]))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_container_is_non_root_read_only_and_bounded(rendered, preset):
    containers = [(o["metadata"]["name"], c) for o in rendered[preset] for pod in _pod_specs(o)
                  for c in pod["containers"] + pod.get("initContainers", [])]
    assert len(containers) >= 8
    for name, c in containers:
        sc = c["securityContext"]
        assert (sc["runAsNonRoot"], sc["runAsUser"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"],
                sc["capabilities"]["drop"], sc["seccompProfile"]["type"]) == (True, 10001, True, False, ["ALL"],
                                                                            "RuntimeDefault"), name
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, name


def test_ray_pods_get_a_memory_backed_dev_shm(rendered):
    for obj in _of_kind(rendered["7b"], "RayCluster") + _of_kind(rendered["7b"], "RayService"):
        for pod in _pod_specs(obj):
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["medium"] == "Memory"


def test_external_values_run_no_in_chart_redis_or_minio_and_use_the_given_secrets(rendered):
    objects = rendered["external"]
    components = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in objects}
    assert not components & {"redis", "minio", "minio-bucket"}
    assert _of_kind(objects, "StatefulSet") == [] and _of_kind(objects, "Secret") == []
    controller = next(o for o in _of_kind(objects, "Deployment") if o["metadata"]["name"] == "demo-cropi-controller")
    env = {e["name"]: e for e in controller["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CROPI_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "cropi-redis", "key": "redis-url"}
    assert env["CROPI_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cropi-s3"
    assert env["CROPI_S3_ENDPOINT"]["value"] == "s3.eu-west-1.amazonaws.com:443"
    assert env["CROPI_S3_SECURE"]["value"] == "1"
    assert env["CROPI_STORE"]["value"] == "s3://ml-cropi/prod"
    assert env["CROPI_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "cropi-token"


def test_default_values_run_redis_and_minio_in_chart_with_generated_credentials(rendered):
    objects = rendered["default"]
    sets = {o["metadata"]["name"]: o for o in _of_kind(objects, "StatefulSet")}
    assert set(sets) == {"demo-cropi-redis", "demo-cropi-minio"}
    for sts in sets.values():
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert "--appendonly yes" in sets["demo-cropi-redis"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    secrets = {o["metadata"]["name"]: o["data"] for o in _of_kind(objects, "Secret")}
    assert set(secrets) == {"demo-cropi-token", "demo-cropi-redis", "demo-cropi-minio"}
    assert all(v for data in secrets.values() for v in data.values())


def test_operator_rbac_is_namespaced_by_default_and_cluster_wide_on_request(chart):
    def rbac(values):
        docs = [d for path, text in chart.render(values=values, name="demo", namespace="ml").items() if path.endswith(".yaml")
                for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        return [d for d in docs if d["apiVersion"].startswith("rbac.")]

    namespaced = rbac({})
    assert {d["kind"] for d in namespaced} == {"Role", "RoleBinding"}
    role = _of_kind(namespaced, "Role")[0]
    assert role["rules"] == [
        {"apiGroups": ["cropi.dev"], "resources": ["curriculumjobs"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": ["cropi.dev"], "resources": ["curriculumjobs/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    assert {d["kind"] for d in rbac({"operator": {"watchAllNamespaces": True}})} == {"ClusterRole",
                                                                                   "ClusterRoleBinding"}


def test_7b_preset_trains_on_16_gpus_over_2_nodes_and_serves_vllm_with_tp_2(rendered):
    objects = rendered["7b"]
    cluster = _of_kind(objects, "RayCluster")[0]["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    trainer = groups["trainer"]
    gpus = trainer["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert (trainer["replicas"], gpus, trainer["replicas"] * gpus) == (2, 8, 16)
    assert trainer["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert trainer["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    projector = groups["projector"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert projector == 8
    service = _of_kind(objects, "RayService")[0]["spec"]
    app = yaml.safe_load(service["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "services.rollout.app:build_app"
    assert (app["args"]["engine"], app["args"]["tensor_parallel"], app["args"]["replicas"]) == ("vllm", "2", "4")
    rollout = service["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert rollout["resources"]["limits"]["nvidia.com/gpu"] == 8  # 4 replicas x TP 2


def test_workers_reach_the_ray_head_through_ray_client(rendered):
    for deploy in _of_kind(rendered["default"], "Deployment"):
        if deploy["metadata"]["labels"]["app.kubernetes.io/component"] in ("rollout", "projector", "trainer"):
            env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env["RAY_ADDRESS"] == "ray://demo-cropi-ray-head-svc:10001"


def test_network_policies_deny_ingress_by_default(rendered):
    policies = {p["metadata"]["name"]: p["spec"] for p in _of_kind(rendered["default"], "NetworkPolicy")}
    deny = policies["demo-cropi-default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    redis_from = policies["demo-cropi-redis"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cropi",
                                                           "app.kubernetes.io/instance": "demo"}}}]


def test_notes_tell_the_next_commands(chart):
    notes = chart.render(values={}, name="demo", namespace="ml")["cropi/templates/NOTES.txt"]
    for needle in ("helm install kuberay-operator kuberay/kuberay-operator", "port-forward svc/demo-cropi-controller",
                   "export CROPI_TOKEN=$(kubectl -n ml get secret demo-cropi-token",
                   "cropi submit examples/arith.yaml --wait", "kubectl -n ml apply -f examples/curriculumjob.yaml",
                   "get cj"):
        assert needle in notes


@pytest.mark.parametrize(("values", "names"), [
    ({"workers": {"trainer": {"replicas": -1}}}, ["workers", "trainer", "replicas"]),
    ({"ray": {"trainer": {"gpus": 2}}}, ["ray", "trainer", "gpuType"]),
    ({"ray": {"trainer": {"gpus": 2, "gpuType": ""}}}, ["ray", "trainer", "gpuType"]),
    ({"controler": {"replicas": 1}}, ["controler"]),
    ({"ray": {"projector": {"gpu": 1}}}, ["ray", "projector", "gpu"]),
    ({"redis": {"enabled": False}}, ["redis", "external"]),
    ({"objectStore": {"minio": {"enabled": False}}}, ["objectStore", "external"]),
])
def test_bad_values_are_rejected_with_a_message_naming_the_key(chart, values, names):
    with pytest.raises(HelmError) as err:
        chart.validate_schema(values)
    message = str(err.value)
    assert all(name in message for name in names), message


def test_preset_values_pass_the_schema(chart):
    for preset in PRESETS:
        chart.validate_schema(_values(preset))


def test_values_schema_is_closed_at_every_level():
    def open_objects(node: Any, path: str = "") -> list[str]:
        found = []
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                found.append(path or "<root>")
            for key, sub in node.items():
                found += open_objects(sub, f"{path}.{key}")
        return found

    assert open_objects(json.loads((CHART / "values.schema.json").read_text())) == []

"""The Helm chart charts/cropi, rendered with real Helm (helm-python-sdk, offline: no cluster runs
here, so `lookup` finds no live Secret and the chart generates fresh ones; tests/helm_render.py).

Built-in objects are checked against the Kubernetes OpenAPI schemas of 1.29-1.33
(kubernetes-validate, strict), KubeRay objects against KubeRay's own CRD schemas."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, lint
from helm_python.errors import HelmError

from tests.helm_render import CHART, PRESET_FILES, preset_values, render_chart
from tests.k8s_schema import kuberay_validator

K8S_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]
PRESETS = list(PRESET_FILES)
WORKER_KINDS = ("rollout", "projector", "trainer")


@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every preset's objects, rendered once for the module."""
    return {preset: render_chart(preset_values(preset)) for preset in PRESETS}


def _of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] in ("RayCluster", "RayService"):
        cluster = _cluster_spec(obj)
        return [cluster["headGroupSpec"]["template"]["spec"],
                *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    return []


def _fullname(objects: list[dict[str, Any]]) -> str:
    """The chart's name prefix, read off the controller's Service (<fullname>-controller)."""
    service = next(o for o in _of_kind(objects, "Service")
                   if o["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
    return service["metadata"]["name"].removesuffix("-controller")


def _ray_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["apiVersion"].startswith("ray.io/")]


def _cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else obj["spec"]


def _groups(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _cluster_spec(obj)["workerGroupSpecs"]}


def _serve_app(service: dict[str, Any]) -> dict[str, Any]:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


def _worker_env(objects: list[dict[str, Any]]) -> dict[str, dict[str, str | None]]:
    """Each task worker Deployment's plain env values, by worker kind."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]:
            {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            for d in _of_kind(objects, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] in WORKER_KINDS}


def _assert_valid_kubernetes(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_chart_lints_clean_in_strict_mode(preset):
    report = lint(CHART, preset_values(preset), strict=True, namespace="ml")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("preset", PRESETS)
def test_every_builtin_object_is_valid_for_kubernetes_1_29_to_1_33(rendered, preset):
    builtin = [o for o in rendered[preset] if not o["apiVersion"].startswith("ray.io/")]
    assert {"Deployment", "Service", "NetworkPolicy"} <= {o["kind"] for o in builtin}
    for obj in builtin:
        _assert_valid_kubernetes(obj)


def _assert_valid_kuberay(obj: dict[str, Any]) -> None:
    body = {k: v for k, v in obj.items() if k != "metadata"}  # metadata is the API server's, not the CRD's
    kuberay_validator(obj["kind"]).validate(body)


@pytest.mark.parametrize("preset", PRESETS)
def test_ray_objects_are_accepted_by_kuberay_crd_schemas(rendered, preset):
    ray_objects = _ray_objects(rendered[preset])
    assert {o["kind"] for o in ray_objects} <= {"RayCluster", "RayService"} and ray_objects, \
        "every preset runs the Ray cluster"
    for obj in ray_objects:
        assert obj["apiVersion"] == "ray.io/v1"
        _assert_valid_kuberay(obj)


@pytest.mark.parametrize("values", [
    {"ray": {"rolloutService": {"enabled": True}}},  # a RayService on CPU
    {"ray": {"rollout": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 2, "gpuType": "NVIDIA-L4"}}},
], ids=["cpu-rollout-service", "gpu-rollout-group"])
def test_ray_objects_of_other_settings_are_accepted_by_kuberay_crd_schemas(values):
    for obj in _ray_objects(render_chart(values)):
        _assert_valid_kuberay(obj)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_exactly_one_ray_cluster_named_after_the_release(rendered, preset):
    (cluster,) = _ray_objects(rendered[preset])
    assert cluster["metadata"]["name"] == f"{_fullname(rendered[preset])}-ray"


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
    assert set(secrets) == {"demo-cropi-token", "demo-cropi-redis", "demo-cropi-minio", "demo-cropi-ray-auth",
                            *(f"demo-cropi-s3-{c}" for c in ("controller", "rollout", "projector", "trainer"))}
    assert all(v for data in secrets.values() for v in data.values())


def test_operator_rbac_is_namespaced_by_default_and_cluster_wide_on_request():
    def rbac(values):
        return [d for d in render_chart(values) if d["apiVersion"].startswith("rbac.")]

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
    (service,) = _of_kind(objects, "RayService")
    groups = _groups(service)
    trainer = groups["trainer"]
    gpus = trainer["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert (trainer["replicas"], gpus, trainer["replicas"] * gpus) == (2, 8, 16)
    assert trainer["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert trainer["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    projector = groups["projector"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert projector == 8
    rollout = groups["rollout"]
    limits = rollout["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (rollout["replicas"], limits["nvidia.com/gpu"]) == (1, 8)  # 4 replicas x TP 2 on one node
    assert rollout["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"


def test_7b_preset_runs_one_ray_service_with_every_group_and_the_standing_rollout_app(rendered):
    objects = rendered["7b"]
    (ray_object,) = _ray_objects(objects)  # no second Ray cluster anywhere
    assert ray_object["kind"] == "RayService"
    assert ray_object["metadata"]["name"] == f"{_fullname(objects)}-ray"
    assert set(_groups(ray_object)) == {"projector", "trainer", "rollout"}
    assert "headGroupSpec" in ray_object["spec"]["rayClusterConfig"]
    # A cluster upgrade would start a new Ray cluster under the running training: recreate instead.
    assert ray_object["spec"]["upgradeStrategy"] == {"type": "None"}
    app = _serve_app(ray_object)
    assert (app["name"], app["import_path"], app["route_prefix"]) == ("cropi-rollout",
                                                                       "services.rollout.app:build_app", None)
    assert app["args"] == {"model_path": "Qwen/Qwen2.5-7B", "engine": "vllm", "dtype": "bfloat16",
                           "tensor_parallel": "2", "replicas": "4", "gpus": "2", "gpu_memory_utilization": "0.85",
                           "batch_size": "256", "cpus": "1"}


def test_with_the_rollout_service_workers_join_its_head_and_sample_on_its_app(rendered):
    objects = rendered["7b"]
    (service,) = _of_kind(objects, "RayService")
    workers = _worker_env(objects)
    assert set(workers) == set(WORKER_KINDS)
    for env in workers.values():
        # KubeRay's stable head Service of a RayService is <RayService name>-head-svc.
        address = urlparse(env["RAY_ADDRESS"])
        assert (address.scheme, address.hostname, address.port) == ("ray", f"{service['metadata']['name']}-head-svc",
                                                                    10001)
        assert env["CROPI_ROLLOUT_APP"] == _serve_app(service)["name"] == "cropi-rollout"


def test_the_standing_app_follows_the_values_and_runs_on_cpu_without_rollout_gpus():
    objects = render_chart({"ray": {"rolloutService": {"enabled": True, "appName": "rollout-a", "batchSize": 64,
                                                       "cpus": 2}}})
    (service,) = _ray_objects(objects)
    assert service["kind"] == "RayService" and "rollout" not in _groups(service)
    args = _serve_app(service)["args"]
    assert (args["model_path"], args["engine"], args["gpus"], args["batch_size"], args["cpus"]) == (
        "builtin:tiny-arith", "hf", "0", "64", "2")
    assert "board" not in args  # the replicas follow the board named after their own app
    assert {env["CROPI_ROLLOUT_APP"] for env in _worker_env(objects).values()} == {"rollout-a"}


def test_ray_pods_of_the_rollout_service_are_admitted_by_the_ray_network_policy(rendered):
    objects = rendered["7b"]
    (service,) = _of_kind(objects, "RayService")
    policy = next(p for p in _of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == f"{_fullname(objects)}-ray")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for pod in (service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
                *(g["template"] for g in _groups(service).values())):
        assert selector.items() <= pod["metadata"]["labels"].items()


def test_default_values_run_a_ray_cluster_without_rollout_group_and_jobs_deploy_their_own_app(rendered):
    objects = rendered["default"]
    (cluster,) = _ray_objects(objects)
    assert cluster["kind"] == "RayCluster" and cluster["metadata"]["name"] == f"{_fullname(objects)}-ray"
    assert set(_groups(cluster)) == {"projector", "trainer"}
    for env in _worker_env(objects).values():
        assert env["RAY_ADDRESS"] == f"ray://{_fullname(objects)}-ray-head-svc:10001"
        assert "CROPI_ROLLOUT_APP" not in env


def test_a_rollout_group_joins_the_ray_cluster_when_it_has_replicas():
    objects = render_chart({"ray": {"rollout": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2, "gpus": 1,
                                                "gpuType": "NVIDIA-L4"}}})
    (cluster,) = _ray_objects(objects)
    assert cluster["kind"] == "RayCluster"
    rollout = _groups(cluster)["rollout"]
    assert (rollout["replicas"], rollout["rayStartParams"]["num-gpus"]) == (2, "1")
    assert rollout["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


def test_without_ray_there_is_no_ray_cluster_and_no_ray_address():
    objects = render_chart({"ray": {"enabled": False}})
    assert _ray_objects(objects) == []
    assert all("RAY_ADDRESS" not in env and "CROPI_ROLLOUT_APP" not in env for env in _worker_env(objects).values())


@pytest.mark.parametrize(("values", "message"), [
    ({"ray": {"enabled": False, "rolloutService": {"enabled": True}}}, "ray.rolloutService.enabled needs ray.enabled"),
    ({"ray": {"rolloutService": {"enabled": True, "engine": "vllm"}}}, "ray.rolloutService.engine vllm needs GPUs"),
    ({"ray": {"rollout": {"replicas": 1, "gpus": 4, "gpuType": "NVIDIA-L4"},
              "rolloutService": {"enabled": True, "replicas": 3, "tensorParallel": 2}}},
     "ray.rolloutService needs replicas x tensorParallel = 6 GPUs but the ray.rollout group has replicas x gpus = 4"),
])
def test_inconsistent_rollout_service_settings_fail_rendering_with_a_message(values, message):
    with pytest.raises(HelmError) as err:
        render_chart(values)
    assert message in str(err.value)


def test_network_policies_deny_ingress_by_default(rendered):
    policies = {p["metadata"]["name"]: p["spec"] for p in _of_kind(rendered["default"], "NetworkPolicy")}
    deny = policies["demo-cropi-default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    redis_from = policies["demo-cropi-redis"]["ingress"][0]["from"]
    assert redis_from == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cropi",
                                                           "app.kubernetes.io/instance": "demo"}}}]


def test_metrics_scrapers_are_admitted_to_the_metrics_ports_only_when_named():
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objects = render_chart({"metrics": {"scrapeFrom": [monitoring]}})
    policy = next(p for p in _of_kind(objects, "NetworkPolicy")
                  if p["metadata"]["name"] == f"{_fullname(objects)}-metrics")
    _assert_valid_kubernetes(policy)
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [monitoring]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]
    # The named ports are the workers' metricsPort and the controller's HTTP port (its /metrics).
    selected = policy["spec"]["podSelector"]["matchExpressions"][0]["values"]
    for deploy in _of_kind(objects, "Deployment"):
        if deploy["metadata"]["labels"]["app.kubernetes.io/component"] in selected:
            ports = {p["name"]: p["containerPort"] for p in deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert ports.get("metrics") == 9090 or ports.get("http") == 8080
    assert set(selected) == {"controller", *WORKER_KINDS}
    assert f"{_fullname(objects)}-metrics" not in {p["metadata"]["name"]
                                                   for p in _of_kind(render_chart(), "NetworkPolicy")}
    assert _of_kind(render_chart({"metrics": {"scrapeFrom": [monitoring]}, "networkPolicy": {"enabled": False}}),
                    "NetworkPolicy") == []


def test_controller_ingress_routes_its_host_to_the_controller_service():
    tls = [{"hosts": ["cropi.example.com"], "secretName": "cropi-tls"}]
    objects = render_chart({"controller": {"ingress": {"enabled": True, "host": "cropi.example.com",
                                                       "className": "nginx", "tls": tls,
                                                       "annotations": {"cert-manager.io/cluster-issuer": "le"}}}})
    (ingress,) = _of_kind(objects, "Ingress")
    _assert_valid_kubernetes(ingress)
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    service = next(o for o in _of_kind(objects, "Service") if o["metadata"]["name"] == f"{_fullname(objects)}-controller")
    assert (rule["host"], path["path"], path["pathType"]) == ("cropi.example.com", "/", "Prefix")
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert service["spec"]["ports"][0]["name"] == "http"
    assert (ingress["spec"]["ingressClassName"], ingress["spec"]["tls"]) == ("nginx", tls)
    assert _of_kind(render_chart(), "Ingress") == []


def test_controller_ingress_without_host_fails_naming_it():
    with pytest.raises(HelmError) as err:
        render_chart({"controller": {"ingress": {"enabled": True}}})
    assert "controller.ingress.host" in str(err.value)


def test_notes_tell_the_next_commands(chart):
    notes = chart.render(values={}, name="demo", namespace="ml")["cropi/templates/NOTES.txt"]
    for needle in ("helm install kuberay-operator kuberay/kuberay-operator", "port-forward svc/demo-cropi-controller",
                   "export CROPI_TOKEN=$(kubectl -n ml get secret demo-cropi-token",
                   "cropi submit examples/arith.yaml --wait", "kubectl -n ml apply -f examples/curriculumjob.yaml",
                   "get cj", "get raycluster demo-cropi-ray"):
        assert needle in notes


def test_notes_name_the_standing_app_and_the_ingress_when_enabled(chart):
    values = {"ray": {"rolloutService": {"enabled": True}},
              "controller": {"ingress": {"enabled": True, "host": "cropi.example.com"}}}
    notes = chart.render(values=values, name="demo", namespace="ml")["cropi/templates/NOTES.txt"]
    for needle in ("get rayservice demo-cropi-ray", '"cropi-rollout"', "CROPI_ROLLOUT_APP",
                   "model.path: builtin:tiny-arith", "cropi submit --controller https://cropi.example.com",
                   "export CROPI_TOKEN=", "controller.allowFrom"):
        assert needle in notes
    assert "rayService" not in notes


@pytest.mark.parametrize(("values", "names"), [
    ({"workers": {"trainer": {"replicas": -1}}}, ["workers", "trainer", "replicas"]),
    ({"ray": {"trainer": {"gpus": 2}}}, ["ray", "trainer", "gpuType"]),
    ({"ray": {"trainer": {"gpus": 2, "gpuType": ""}}}, ["ray", "trainer", "gpuType"]),
    ({"controler": {"replicas": 1}}, ["controler"]),
    ({"ray": {"projector": {"gpu": 1}}}, ["ray", "projector", "gpu"]),
    ({"redis": {"enabled": False}}, ["redis", "external"]),
    ({"objectStore": {"minio": {"enabled": False}}}, ["objectStore", "external"]),
    ({"ray": {"rolloutService": {"engine": "foo"}}}, ["ray", "rolloutService", "engine"]),
    ({"ray": {"rolloutService": {"board": "x"}}}, ["ray", "rolloutService", "board"]),
    ({"ray": {"rolloutService": {"appName": "Not_A_Label"}}}, ["ray", "rolloutService", "appName"]),
    ({"ray": {"rolloutService": {"gpuMemoryUtilization": 0}}}, ["ray", "rolloutService", "gpuMemoryUtilization"]),
    ({"ray": {"rollout": {"replicas": -1}}}, ["ray", "rollout", "replicas"]),
    ({"ray": {"rollout": {"replicas": 1, "gpus": 8}}}, ["ray", "rollout", "gpuType"]),
    ({"rollout": {"rayService": {"enabled": True}}}, ["rollout"]),  # the old layout: one Ray cluster now
    ({"metrics": {"scrapeFrom": [{"namespace": "monitoring"}]}}, ["metrics", "scrapeFrom", "namespace"]),
    ({"controller": {"ingress": {"pathType": "Regex"}}}, ["controller", "ingress", "pathType"]),
])
def test_bad_values_are_rejected_with_a_message_naming_the_key(chart, values, names):
    with pytest.raises(HelmError) as err:
        chart.validate_schema(values)
    message = str(err.value)
    assert all(name in message for name in names), message


def test_preset_values_pass_the_schema(chart):
    for preset in PRESETS:
        chart.validate_schema(preset_values(preset))


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

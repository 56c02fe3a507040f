"""Security checklist of the Helm chart, part 1: network and identity.

Rendered with real Helm (tests/helm_render.py, offline: `lookup` finds no live Secret). Each test is
one item of the checklist:

- Ray's ports (dashboard/Jobs API 8265, Serve 8000/52365, GCS 6379, Ray Client 10001, the rest) are
  admitted only from the release's own pods in the release namespace; the one exception is the
  KubeRay operator's pods (its namespace AND its labels), to the head's 8265 and 8000, and only when
  a RayService needs it.
- Ray runs with token authentication: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret on every
  Ray node and Ray client, KubeRay told the same Secret.
- No pod but MinIO and its setup Job sees MinIO's root credentials; each component reaches the store
  with its own user and Secret, and its bucket policy allows what its data flow needs and no more.
- Egress is denied by default except DNS, the release's own pods and (operator) the API server.
- Generated secrets are stable when given as values, kept from the live Secret otherwise (`lookup`).
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import json
import re
from typing import Any

import kubernetes_validate
import pytest
from helm_python import Chart
from helm_python.errors import HelmError

from cropi.curriculum import layout
from tests.helm_render import CHART, PRESET_FILES, preset_values, render_chart
from tests.k8s_schema import kuberay_validator

PRESETS = list(PRESET_FILES)
STORE_COMPONENTS = ("controller", "rollout", "projector", "trainer")
RELEASE = {"app.kubernetes.io/name": "cropi", "app.kubernetes.io/instance": "demo"}
ROOT_KEYS = {"root-user", "root-password"}
# Renders beyond the presets that change the Ray object or its policies.
VARIANTS: dict[str, dict[str, Any]] = {
    "cpu-rollout-service": {"ray": {"rolloutService": {"enabled": True}}},
    "scrapers-and-ingress": {
        "metrics": {"scrapeFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}]},
        "controller": {"allowFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}},
                                     {"ipBlock": {"cidr": "10.0.0.0/8"}}]},
        "ray": {"rolloutService": {"enabled": True}},
    },
}


# ----------------------------------------------------------------------------- helpers
@functools.cache
def _render(case: str) -> tuple[dict[str, Any], ...]:
    values = preset_values(case) if case in PRESET_FILES else VARIANTS[case]
    return tuple(render_chart(values))


def _of_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def _ray_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else obj["spec"]


def _pod_templates(objects) -> list[tuple[str, dict[str, Any]]]:
    """(owner name, pod template) of every pod the release runs, the Ray nodes included."""
    pods = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            pods.append((o["metadata"]["name"], o["spec"]["template"]))
        elif o["kind"] in ("RayCluster", "RayService"):
            spec = _ray_spec(o)
            pods.append((f"{o['metadata']['name']}/head", spec["headGroupSpec"]["template"]))
            pods += [(f"{o['metadata']['name']}/{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    return pods


def _ray_pods(objects) -> list[tuple[str, dict[str, Any]]]:
    return [(n, t) for n, t in _pod_templates(objects) if t["metadata"]["labels"].get("cropi.dev/ray") == "true"]


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _policies(objects, policy_type: str) -> list[dict[str, Any]]:
    return [p for p in _of_kind(objects, "NetworkPolicy") if policy_type in p["spec"]["policyTypes"]]


def _secret_refs(template: dict[str, Any]) -> set[tuple[str, str | None]]:
    """Every (Secret name, key) a pod template reads: env, envFrom (key None) and secret volumes."""
    refs = set()
    for c in _containers(template):
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                refs.add((source["secretRef"]["name"], None))
    for v in template["spec"].get("volumes", []):
        if "secret" in v:
            items = v["secret"].get("items") or [{"key": None}]
            refs |= {(v["secret"]["secretName"], i["key"]) for i in items}
    return refs


def _secrets(objects) -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: s["data"] for s in _of_kind(objects, "Secret")}


def _valid_for_kubernetes(obj: dict[str, Any]) -> None:
    for version in ("1.29", "1.33"):
        kubernetes_validate.validate(obj, version, strict=True)


# ----------------------------------------------------------------------------- Ray's ports
@pytest.mark.parametrize("case", PRESETS + list(VARIANTS))
def test_ray_ports_are_admitted_only_from_the_releases_own_pods(case):
    objects = _render(case)
    ray_pods = _ray_pods(objects)
    assert ray_pods, "every case runs the Ray cluster"
    has_service = bool(_of_kind(objects, "RayService"))
    admitting = 0
    for policy in _policies(objects, "Ingress"):
        spec = policy["spec"]
        selected = [n for n, t in ray_pods if _selects(spec["podSelector"], t["metadata"]["labels"])]
        if not selected:
            continue
        for rule in spec.get("ingress", []):
            admitting += 1
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{policy['metadata']['name']}: ipBlock peer on Ray pods"
                labels = (peer.get("podSelector") or {}).get("matchLabels") or {}
                if "namespaceSelector" not in peer:
                    # Same namespace; and only this release's pods, not any pod of the namespace.
                    assert RELEASE.items() <= labels.items(), (policy["metadata"]["name"], peer)
                    continue
                # The one cross-namespace peer: the KubeRay operator, for a RayService, to the head's
                # dashboard and Serve proxy only.
                assert has_service, f"{policy['metadata']['name']}: cross-namespace peer without a RayService"
                assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}
                assert labels == {"app.kubernetes.io/name": "kuberay-operator"}, "namespace AND pod labels"
                assert {p["port"] for p in rule["ports"]} == {8265, 8000}
                assert {n.rsplit("/", 1)[1] for n in selected} == {"head"}
    assert admitting, "some policy admits the Ray clients"


def test_ray_pods_admit_the_ray_nodes_and_the_task_workers_only():
    objects = _render("default")
    (policy,) = [p for p in _policies(objects, "Ingress") if p["metadata"]["name"] == "demo-cropi-ray"]
    (rule,) = policy["spec"]["ingress"]
    assert "ports" not in rule  # every Ray port: GCS, Ray Client, raylets, object transfer, NCCL
    admitted = {_component(o) for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")
                if any(_selects(peer["podSelector"], o["spec"]["template"]["metadata"]["labels"])
                       for peer in rule["from"])}
    assert admitted == {"rollout", "projector", "trainer"}  # not the controller, operator, Redis, MinIO
    for _, template in _ray_pods(objects):
        assert any(_selects(peer["podSelector"], template["metadata"]["labels"]) for peer in rule["from"])


def test_the_kuberay_operator_is_admitted_only_for_a_ray_service_and_only_as_configured():
    names = lambda objects: {p["metadata"]["name"] for p in _of_kind(objects, "NetworkPolicy")}
    assert "demo-cropi-ray-operator" not in names(_render("default"))  # a RayCluster needs no dashboard caller
    assert "demo-cropi-ray-operator" in names(_render("7b"))
    service = {"ray": {"rolloutService": {"enabled": True}}}
    off = render_chart({**service, "networkPolicy": {"kubeRayOperator": {"namespace": ""}}})
    assert "demo-cropi-ray-operator" not in names(off)
    # An operator installed in the release namespace: a podSelector alone, no namespaceSelector.
    same = render_chart({**service, "networkPolicy": {"kubeRayOperator": {"namespace": "ml"}}})
    (policy,) = [p for p in _of_kind(same, "NetworkPolicy") if p["metadata"]["name"] == "demo-cropi-ray-operator"]
    _valid_for_kubernetes(policy)
    assert policy["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]


def test_no_policy_admits_everything_and_the_controller_keeps_its_api_port():
    objects = _render("scrapers-and-ingress")
    for policy in _policies(objects, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), policy["metadata"]["name"]
    (controller,) = [p for p in _of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "demo-cropi-controller"]
    (rule,) = controller["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"][0] == {"podSelector": {}}  # the release namespace's pods, as before
    assert rule["from"][1:] == VARIANTS["scrapers-and-ingress"]["controller"]["allowFrom"]


@pytest.mark.parametrize("component", ["redis", "minio"])
def test_redis_and_minio_admit_only_the_releases_pods_on_their_port(component):
    objects = _render("default")
    (policy,) = [p for p in _of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == f"demo-cropi-{component}"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": RELEASE}}]
    assert rule["ports"] == [{"port": 6379 if component == "redis" else 9000, "protocol": "TCP"}]


# ----------------------------------------------------------------------------- Ray token auth
@pytest.mark.parametrize("case", PRESETS + ["cpu-rollout-service"])
def test_every_ray_node_and_ray_client_authenticates_with_the_token_from_a_secret(case):
    objects = _render(case)
    ray_objects = _of_kind(objects, "RayCluster") + _of_kind(objects, "RayService")
    (ray_object,) = ray_objects
    auth = _ray_spec(ray_object)["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]
    clients = [(o["metadata"]["name"], o["spec"]["template"]) for o in _of_kind(objects, "Deployment")
               if _component(o) in ("rollout", "projector", "trainer")]
    for name, template in _ray_pods(objects) + clients:
        for container in template["spec"]["containers"]:
            env = _env(container)
            assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, name
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, f"{name}: the token must not be inline"
            assert token["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}, name
    if case == "external":  # the preset brings its own Secret
        assert secret == "cropi-ray-auth" and secret not in _secrets(objects)
    else:
        assert secret == "demo-cropi-ray-auth" and _secrets(objects)[secret]["auth_token"]


def test_pods_that_never_join_ray_do_not_get_its_token():
    objects = _render("7b")
    for name, template in _pod_templates(objects):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in ("controller", "operator", "redis", "minio", "minio-setup"):
            assert not {ref for ref in _secret_refs(template) if ref[0] == "demo-cropi-ray-auth"}, name


def test_ray_objects_with_token_auth_are_accepted_by_the_kuberay_crd_schemas():
    for case in PRESETS + list(VARIANTS):
        for obj in _of_kind(_render(case), "RayCluster") + _of_kind(_render(case), "RayService"):
            kuberay_validator(obj["kind"]).validate({k: v for k, v in obj.items() if k != "metadata"})


def test_token_auth_needs_ray_2_52_and_can_be_named_or_switched_off():
    with pytest.raises(HelmError) as err:
        render_chart({"ray": {"rayVersion": "2.51.2"}})
    assert "ray.auth.enabled needs ray.rayVersion >= 2.52.0" in str(err.value)
    named = render_chart({"ray": {"auth": {"existingSecret": "my-ray-token"}}})
    (cluster,) = _of_kind(named, "RayCluster")
    assert cluster["spec"]["authOptions"]["secretName"] == "my-ray-token"
    assert "demo-cropi-ray-auth" not in _secrets(named)
    off = render_chart({"ray": {"auth": {"enabled": False}}})
    (cluster,) = _of_kind(off, "RayCluster")
    assert "authOptions" not in cluster["spec"] and "demo-cropi-ray-auth" not in _secrets(off)
    assert all("RAY_AUTH_TOKEN" not in _env(c) for _, t in _pod_templates(off) for c in _containers(t))


# ----------------------------------------------------------------------------- object-store identities
@pytest.mark.parametrize("case", PRESETS + ["cpu-rollout-service"])
def test_no_pod_but_minio_and_its_setup_job_sees_the_root_credentials(case):
    objects = _render(case)
    for name, template in _pod_templates(objects):
        root_refs = {ref for ref in _secret_refs(template) if ref[1] in ROOT_KEYS or ref[0] == "demo-cropi-minio"}
        env_names = {e for c in _containers(template) for e in _env(c)}
        if template["metadata"]["labels"]["app.kubernetes.io/component"] in ("minio", "minio-setup"):
            continue
        assert not root_refs, f"{name} reads MinIO's root credentials: {root_refs}"
        assert not env_names & {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}, name


@pytest.mark.parametrize("case", ["default", "7b", "cpu-rollout-service"])
def test_each_component_reaches_the_store_with_its_own_secret(case):
    objects = _render(case)
    secrets = _secrets(objects)
    used = {}
    for name, template in _pod_templates(objects):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in template["spec"]["containers"]:
            env = _env(container)
            if "CROPI_S3_ACCESS_KEY" not in env:
                continue
            access, secret = (env[k]["valueFrom"]["secretKeyRef"] for k in ("CROPI_S3_ACCESS_KEY", "CROPI_S3_SECRET_KEY"))
            assert access["name"] == secret["name"] and (access["key"], secret["key"]) == ("access-key", "secret-key")
            # The Ray nodes serve the standing rollout app: the rollout identity.
            owner = "rollout" if component.startswith("ray-") else component
            assert access["name"] == f"demo-cropi-s3-{owner}", name
            used.setdefault(owner, set()).add(access["name"])
            assert base64.b64decode(secrets[access["name"]]["access-key"]).decode() == f"cropi-{owner}"
    assert set(used) == set(STORE_COMPONENTS)
    assert len(set.union(*used.values())) == len(STORE_COMPONENTS)  # four Secrets, four users
    if case == "default":  # without the standing app the Ray nodes hold no store credentials at all
        assert all("CROPI_S3_ACCESS_KEY" not in _env(c) for _, t in _ray_pods(objects) for c in _containers(t))
    # ...and never the Redis password (the Ray Train workers get their URL from the trainer's task).
    assert all("CROPI_REDIS_PASSWORD" not in _env(c) for _, t in _ray_pods(objects) for c in _containers(t))


def test_the_setup_job_creates_one_user_and_policy_per_component():
    objects = _render("default")
    (job,) = _of_kind(objects, "Job")
    (config,) = [c for c in _of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "demo-cropi-minio-setup"]
    _valid_for_kubernetes(job)
    _valid_for_kubernetes(config)
    script = config["data"]["setup.sh"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["sh", "/setup/setup.sh"]
    refs = _secret_refs(job["spec"]["template"])
    assert {("demo-cropi-minio", "root-user"), ("demo-cropi-minio", "root-password")} <= refs
    for c in STORE_COMPONENTS:
        var = f"S3_{c.upper()}"
        assert {(f"demo-cropi-s3-{c}", "access-key"), (f"demo-cropi-s3-{c}", "secret-key")} <= refs
        assert f"mc admin policy create store cropi-{c} /setup/policy-{c}.json" in script
        assert f'mc admin user add store "${var}_ACCESS_KEY" "${var}_SECRET_KEY"' in script
        assert f'attach cropi-{c} "${var}_ACCESS_KEY"' in script
        json.loads(config["data"][f"policy-{c}.json"])
    assert script.index("mc mb --ignore-existing") < script.index("mc admin policy create")


# A minimal evaluator of the bucket policies (Allow statements only, as the chart writes them): in S3
# and MinIO resource ARNs `*` matches any characters, '/' included.
def _allows(policy: dict[str, Any], action: str, resource: str) -> bool:
    return any(s["Effect"] == "Allow" and action in s["Action"]
               and any(fnmatch.fnmatchcase(resource, r) for r in s["Resource"]) for s in policy["Statement"])


def _policy(objects, component: str) -> dict[str, Any]:
    (config,) = [c for c in _of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "demo-cropi-minio-setup"]
    return json.loads(config["data"][f"policy-{component}.json"])


J = "job-a"
KEYS = {  # every kind of key a job writes (cropi/curriculum/layout.py)
    "spec": layout.spec_key(J), "events": layout.events_key(J),
    "offline": layout.offline_part_key(J, "pool", 3), "timing": layout.offline_timing_key(J),
    "grads": layout.grads_key(J, 1, "pool", 2), "grads-meta": layout.grads_key(J, 1, "pool", 2)[:-4] + ".json",
    "selection": layout.selection_key(J, 1), "metrics": layout.stage_metrics_key(J, 1),
    "checkpoint": layout.checkpoint_prefix(J, 2) + "/model.safetensors",
    "final": layout.final_checkpoint_prefix(J) + "/model.safetensors",
    "state": layout.trainer_state_key(J), "zero": layout.zero_slot(J, 7) + "/mp_rank_00_model_states.pt",
    "weights": layout.published_weights_prefix(J) + "/model.safetensors",
}
# What each component's data flow needs: written keys (read back too: existence checks, resumes).
WRITES = {
    "controller": {"spec", "events", "timing", "selection"},
    "rollout": {"offline"},
    "projector": {"grads", "grads-meta"},
    "trainer": {"state", "zero", "weights", "metrics", "checkpoint", "final"},
}
READS = {
    "controller": {"offline", "grads", "grads-meta"},
    "rollout": {"spec", "checkpoint", "final", "weights"},
    "projector": {"spec", "offline", "checkpoint"},
    "trainer": {"spec", "selection"},
}


@pytest.mark.parametrize("component", STORE_COMPONENTS)
def test_each_minio_user_may_do_exactly_what_its_component_needs(component):
    policy = _policy(_render("default"), component)
    for name, key in KEYS.items():
        arn = f"arn:aws:s3:::cropi/prod/{key}"
        writes, reads = name in WRITES[component], name in WRITES[component] | READS[component]
        assert _allows(policy, "s3:PutObject", arn) == writes, (component, "write", name)
        assert _allows(policy, "s3:GetObject", arn) == reads, (component, "read", name)
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions <= {"s3:GetBucketLocation", "s3:ListBucket", "s3:GetObject", "s3:PutObject",
                       "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}  # no delete, no admin, no s3:*
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert all(r == "arn:aws:s3:::cropi" or r.startswith("arn:aws:s3:::cropi/prod/jobs/") for r in resources)
    assert not _allows(policy, "s3:GetObject", "arn:aws:s3:::cropi/other/" + KEYS["spec"])  # another prefix
    assert not _allows(policy, "s3:GetObject", "arn:aws:s3:::other-bucket/prod/" + KEYS["spec"])


def test_the_store_scope_gives_every_user_the_whole_prefix_and_nothing_else():
    objects = render_chart({"objectStore": {"prefix": "", "minio": {"accessScope": "store"}}})
    for component in STORE_COMPONENTS:
        policy = _policy(objects, component)
        assert all(_allows(policy, a, f"arn:aws:s3:::cropi/{k}") for k in KEYS.values()
                   for a in ("s3:GetObject", "s3:PutObject"))
        assert not _allows(policy, "s3:PutObject", "arn:aws:s3:::other-bucket/x")
        assert not _allows(policy, "s3:DeleteObject", f"arn:aws:s3:::cropi/{KEYS['spec']}")


def test_external_s3_identities_can_be_split_per_component():
    values = preset_values("external")
    shared = render_chart(values)
    split = render_chart({**values, "objectStore": {**values["objectStore"], "external": {
        **values["objectStore"]["external"], "componentSecrets": {c: f"s3-{c}" for c in STORE_COMPONENTS}}}})
    for objects, expect in ((shared, lambda c: "cropi-s3"), (split, lambda c: f"s3-{c}")):
        for d in _of_kind(objects, "Deployment"):
            if _component(d) in STORE_COMPONENTS:
                env = _env(d["spec"]["template"]["spec"]["containers"][0])
                assert env["CROPI_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == expect(_component(d))


# ----------------------------------------------------------------------------- egress
@pytest.mark.parametrize("case", PRESETS)
def test_every_pod_is_under_an_egress_policy_that_allows_dns(case):
    objects = _render(case)
    egress = _policies(objects, "Egress")
    for policy in egress:
        _valid_for_kubernetes(policy)
    for name, template in _pod_templates(objects):
        mine = [p for p in egress if _selects(p["spec"]["podSelector"], template["metadata"]["labels"])]
        assert mine, f"{name}: no egress policy, egress unrestricted"
        rules = [r for p in mine for r in p["spec"].get("egress", [])]
        dns = [r for r in rules if {(p["port"], p["protocol"]) for p in r.get("ports", [])} == {(53, "UDP"), (53, "TCP")}]
        assert dns and dns[0]["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                         "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}], name


def test_by_default_egress_reaches_only_dns_the_release_and_for_the_operator_the_api_server():
    objects = _render("default")
    for policy in _policies(objects, "Egress"):
        for rule in policy["spec"]["egress"]:
            assert rule.get("to"), f"{policy['metadata']['name']}: a rule to every destination"
            for peer in rule["to"]:
                if "ipBlock" in peer:  # the API server: the operator's pod, its two ports only
                    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
                    assert {p["port"] for p in rule["ports"]} == {443, 6443}
                elif "namespaceSelector" in peer:
                    assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {(53, "UDP"), (53, "TCP")}
                else:
                    assert RELEASE.items() <= peer["podSelector"]["matchLabels"].items()
    assert "demo-cropi-egress-extra" not in {p["metadata"]["name"] for p in _of_kind(objects, "NetworkPolicy")}


def test_more_egress_only_on_request():
    rule = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
    extra = render_chart({"networkPolicy": {"egress": {"extra": [rule]}}})
    (policy,) = [p for p in _of_kind(extra, "NetworkPolicy") if p["metadata"]["name"] == "demo-cropi-egress-extra"]
    _valid_for_kubernetes(policy)
    assert policy["spec"]["egress"] == [rule]
    opened = render_chart({"networkPolicy": {"egress": {"allowExternal": True}}})
    (policy,) = [p for p in _of_kind(opened, "NetworkPolicy") if p["metadata"]["name"] == "demo-cropi-egress-extra"]
    assert policy["spec"]["egress"] == [{}]
    # The presets that need the outside open ports, not everything.
    for case in ("7b", "external"):
        (policy,) = [p for p in _of_kind(_render(case), "NetworkPolicy")
                     if p["metadata"]["name"] == "demo-cropi-egress-extra"]
        assert all(r.get("ports") for r in policy["spec"]["egress"]), case


@pytest.mark.parametrize(("values", "names"), [
    ({"networkPolicy": {"egress": {"extra": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "port": 443}]}}},
     ["networkPolicy", "egress", "extra", "port"]),
    ({"networkPolicy": {"egress": {"dns": []}}}, ["networkPolicy", "egress", "dns"]),
    ({"networkPolicy": {"kubeRayOperator": {"namespaces": ["ray-system"]}}}, ["kubeRayOperator", "namespaces"]),
    ({"objectStore": {"minio": {"accessScope": "all"}}}, ["objectStore", "minio", "accessScope"]),
    ({"objectStore": {"minio": {"users": {"trainer": {"secretKey": "short"}}}}}, ["users", "trainer", "secretKey"]),
    ({"objectStore": {"minio": {"users": {"evaluator": {}}}}}, ["users", "evaluator"]),
    ({"ray": {"auth": {"tokenKey": "x"}}}, ["ray", "auth", "tokenKey"]),
])
def test_the_schema_refuses_bad_network_and_identity_values(values, names):
    with Chart.load(CHART) as chart, pytest.raises(HelmError) as err:
        chart.validate_schema(values)
    assert all(name in str(err.value) for name in names), str(err.value)


# ----------------------------------------------------------------------------- stable secrets
GIVEN = {
    "auth": {"token": "controller-token-0123456789", "operatorToken": "operator-token-0123456789"},
    "redis": {"auth": {"password": "redis-password-0123456789"}},
    "objectStore": {"minio": {"rootUser": "root-admin", "rootPassword": "root-password-0123456789",
                              "users": {c: {"secretKey": f"{c}-secret-0123456789"} for c in STORE_COMPONENTS}}},
    "ray": {"auth": {"token": "ray-token-0123456789abcdef"}},
}


def test_secrets_given_as_values_render_identically_every_time():
    first, second = _secrets(render_chart(GIVEN)), _secrets(render_chart(GIVEN))
    assert first == second
    assert len(first) == 3 + len(STORE_COMPONENTS) + 1  # token, Redis, MinIO root, four users, Ray
    assert base64.b64decode(first["demo-cropi-ray-auth"]["auth_token"]).decode() == GIVEN["ray"]["auth"]["token"]
    assert base64.b64decode(first["demo-cropi-s3-trainer"]["secret-key"]).decode() == "trainer-secret-0123456789"
    for secret in _of_kind(render_chart(GIVEN), "Secret"):
        assert secret["metadata"]["annotations"]["cropi.dev/secret-source"] == "values"


def test_unset_secrets_are_generated_and_marked_so():
    # Offline (helm template, GitOps) `lookup` sees no live Secret: every render draws new values,
    # which is why the chart documents values or existing Secrets for those renderers.
    first, second = _secrets(render_chart()), _secrets(render_chart())
    for name in first:
        generated = {k for k, v in first[name].items() if v != second[name][k]}
        assert generated, name  # the access keys are fixed names, every secret part is drawn
    for secret in _of_kind(render_chart(), "Secret"):
        assert secret["metadata"]["annotations"]["cropi.dev/secret-source"] == "generated"
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_generated_values_are_read_back_from_the_live_secret_with_lookup():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = helpers[helpers.index('define "cropi.secretValue"'):]
    body = body[:body.index("{{- end -}}\n{{- end -}}")]
    assert 'lookup "v1" "Secret" .ctx.Release.Namespace .name' in body
    # Order: the given value, then the live one, and only then a random one.
    assert body.index(".value") < body.index("lookup") < body.index("randAlphaNum")
    secrets = (CHART / "templates" / "secrets.yaml").read_text()
    # Every value of every `data:` block (two-space indented entries after it).
    data = [line.split(": ", 1)[1] for block in re.findall(r"^data:\n((?:  .*\n)+)", secrets, flags=re.M)
            for line in block.splitlines()]
    secret_values = [v for v in data if "cropi.minioUser" not in v]  # the access keys are user names
    assert len(secret_values) == 7  # token, operator token, Redis, root user and password, user secret key, Ray token
    assert all(v.startswith('{{ include "cropi.secretValue"') for v in secret_values), secret_values
    assert "randAlphaNum" not in secrets and "lookup \"" not in secrets  # nothing bypasses the helper


def test_existing_secrets_replace_every_generated_one():
    values = {"auth": {"existingSecret": "t"}, "redis": {"auth": {"existingSecret": "r"}},
              "objectStore": {"minio": {"existingSecret": "root", "users": {c: {"existingSecret": f"u-{c}"}
                                                                          for c in STORE_COMPONENTS}}},
              "ray": {"auth": {"existingSecret": "ray"}}}
    objects = render_chart(values)
    assert _of_kind(objects, "Secret") == []
    refs = {ref[0] for _, t in _pod_templates(objects) for ref in _secret_refs(t)}
    assert refs == {"t", "r", "root", "ray", *(f"u-{c}" for c in STORE_COMPONENTS)}


def test_the_setup_job_is_no_hook_and_is_renamed_when_what_it_does_changes():
    # A post-install hook would run only after the release's pods are ready (helm --wait, Argo CD's
    # PostSync), and the services cannot be ready before their MinIO users exist.
    def job(values=None):
        (j,) = _of_kind(render_chart(values), "Job")
        return j

    first = job()
    assert "helm.sh/hook" not in (first["metadata"].get("annotations") or {})
    assert "ttlSecondsAfterFinished" not in first["spec"]  # a vanished Job would be re-created by GitOps
    assert first["metadata"]["name"] == job()["metadata"]["name"]  # generated secrets do not enter the name
    assert first["metadata"]["name"].startswith("demo-cropi-minio-setup-")
    changed = job({"objectStore": {"minio": {"accessScope": "store"}}})
    assert changed["metadata"]["name"] != first["metadata"]["name"]

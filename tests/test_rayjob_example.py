"""examples/rayjob.yaml, the one-off run as a KubeRay RayJob: its RayJob passes KubeRay's CRD schema,
its ConfigMap and pod templates pass Kubernetes' schemas, the embedded job spec parses with cropi's
own parser and fits the cluster it gets, and its upload script copies a run folder to S3 (moto)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cropi.spec import parse_spec_yaml
from tests.k8s_schema import kuberay_validator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rayjob.yaml"
DOCS = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
(CONFIG,) = [d for d in DOCS if d["kind"] == "ConfigMap"]
(RAYJOB,) = [d for d in DOCS if d["kind"] == "RayJob"]
CLUSTER = RAYJOB["spec"]["rayClusterSpec"]
(GPU_GROUP,) = CLUSTER["workerGroupSpecs"]


def _templates() -> dict[str, dict[str, Any]]:
    return {"submitter": RAYJOB["spec"]["submitterPodTemplate"], "head": CLUSTER["headGroupSpec"]["template"],
            "gpu": GPU_GROUP["template"]}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_file_holds_one_configmap_and_one_rayjob_of_ray_io_v1():
    assert [d["kind"] for d in DOCS] == ["ConfigMap", "RayJob"]
    assert RAYJOB["apiVersion"] == "ray.io/v1"


def test_the_rayjob_passes_kuberays_crd_schema():
    kuberay_validator("RayJob").validate({k: v for k, v in RAYJOB.items() if k != "metadata"})


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_the_configmap_and_every_pod_template_pass_kubernetes_schemas(version):
    kubernetes_validate.validate(CONFIG, version, strict=True)
    for name, template in _templates().items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"rayjob-{name}", **template.get("metadata", {})},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)


def test_the_embedded_job_spec_parses_and_runs_on_ray_joining_the_jobs_cluster():
    spec = parse_spec_yaml(CONFIG["data"]["job.yaml"], "examples/rayjob.yaml#job.yaml")
    assert spec.executor == "ray" and spec.ray.address is None and spec.ray.rollout_app is None
    # Its GPUs are the one GPU pod's: every actor shares the pod with the driver.
    wanted = (spec.ray.projector_actors * spec.ray.projector_gpus + spec.ray.trainer_workers * spec.ray.trainer_gpus
              + spec.ray.rollout_replicas * spec.ray.rollout_gpus)
    container = GPU_GROUP["template"]["spec"]["containers"][0]
    assert wanted == int(GPU_GROUP["rayStartParams"]["num-gpus"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert GPU_GROUP["replicas"] == GPU_GROUP["minReplicas"] == GPU_GROUP["maxReplicas"] == 1
    assert CLUSTER["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing scheduled on the head


def test_the_entrypoint_runs_the_mounted_spec_on_the_gpu_pod_and_uploads_the_run_folder():
    spec = parse_spec_yaml(CONFIG["data"]["job.yaml"])
    script = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert script[:2] == ["sh", "-c"]
    words = shlex.split(script[2].replace(";", " ; "))
    run = words.index("run")
    assert words[run - 1:run + 2] == ["cropi", "run", "/etc/cropi/job.yaml"]
    out = words[words.index("--out") + 1]
    assert Path(out).name == spec.name and out.startswith("/tmp/")  # /tmp: the pod's writable emptyDir
    assert ["python", "/etc/cropi/upload.py", out] == words[words.index("python"):words.index("python") + 3]
    assert script[2].rstrip().endswith("exit $rc")  # the run's exit status is the job's
    # The driver goes where the ConfigMap is mounted: the pod with the custom resource.
    wanted = json.loads(RAYJOB["spec"]["entrypointResources"])
    offered = json.loads(json.loads(GPU_GROUP["rayStartParams"]["resources"]))
    assert wanted == offered == {"cropi_driver": 1}
    pod = GPU_GROUP["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap")]
    assert volume["configMap"]["name"] == CONFIG["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[volume["name"]] == "/etc/cropi"


def test_the_cluster_is_torn_down_after_the_job():
    spec = RAYJOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0


def test_every_container_authenticates_to_ray_with_the_token_secret_as_the_chart_does():
    assert CLUSTER["authOptions"]["mode"] == "token"
    secret = CLUSTER["authOptions"]["secretName"]
    for name, template in _templates().items():
        for container in template["spec"]["containers"]:
            env = _env(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}, name


def test_the_images_are_the_charts_and_the_pods_are_locked_down_like_the_charts():
    image = yaml.safe_load((ROOT / "charts" / "cropi" / "values.yaml").read_text())["image"]
    cpu, gpu = f"{image['repository']}:{image['cpuTag']}", f"{image['repository']}:{image['gpuTag']}"
    templates = _templates()
    assert templates["gpu"]["spec"]["containers"][0]["image"] == gpu
    assert templates["head"]["spec"]["containers"][0]["image"] == templates["submitter"]["spec"]["containers"][0][
        "image"] == cpu
    for name, template in templates.items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"], sc["capabilities"]["drop"]) == (
                True, False, ["ALL"]), name
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name
            assert container["resources"]["requests"] and container["resources"]["limits"], name


def test_the_store_and_its_credentials_come_from_the_environment_and_a_secret():
    env = _env(GPU_GROUP["template"]["spec"]["containers"][0])
    assert env["CROPI_STORE"]["value"].startswith("s3://")
    for key in ("CROPI_S3_ACCESS_KEY", "CROPI_S3_SECRET_KEY"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"] == "cropi-s3"


def test_the_upload_script_copies_the_run_folder_but_redis_and_the_bulky_store_parts(tmp_path, moto_server):
    run = tmp_path / "qwen25-15b-gsm8k-ray"
    job = "store/jobs/qwen25-15b-gsm8k-ray"
    kept = {"metrics.jsonl": b'{"step": 1}\n', "checkpoint/model.safetensors": b"\x00" * 64,
            "tb/events.out.tfevents.1": b"tb", f"{job}/spec.yaml": b"x", f"{job}/stages/0/selection.json": b"{}"}
    left = {"redis/appendonly.aof": b"r", f"{job}/offline/pool/part-00000.parquet": b"p",
            f"{job}/stages/0/grads/train-00000.pt": b"g", f"{job}/trainer/state.pt": b"s",
            f"{job}/stages/0/checkpoint/model.safetensors": b"c"}
    for rel, data in {**kept, **left}.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    script = tmp_path / "upload.py"
    script.write_text(CONFIG["data"]["upload.py"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CROPI_S3_"))}
    env.update(CROPI_STORE="s3://rayjob-results/rayjobs", CROPI_S3_ENDPOINT=moto_server.endpoint,
               CROPI_S3_ACCESS_KEY="k", CROPI_S3_SECRET_KEY="s", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script), str(run)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"copied {len(kept)} files" in done.stdout
    from minio import Minio

    client = Minio(moto_server.endpoint, access_key="k", secret_key="s", secure=False)
    names = sorted(o.object_name for o in client.list_objects("rayjob-results", recursive=True))
    base = "rayjobs/runs/qwen25-15b-gsm8k-ray"
    assert names == sorted(f"{base}/{rel}" for rel in kept)
    assert client.get_object("rayjob-results", f"{base}/metrics.jsonl").read() == b'{"step": 1}\n'

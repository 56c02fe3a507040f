"""The chart's controller values of issue H: data roots reach every pod that reads job data, the
controller may run replicas (one holds the lease) with a rolling update, and the lease and
retention periods are values. Rendered by real Helm; the values schema refuses what cannot work."""

from __future__ import annotations

import pytest
from helm_python.errors import HelmError

from ..helm_render import render_chart

READERS = ("demo-cropi-controller", "demo-cropi-rollout", "demo-cropi-projector", "demo-cropi-trainer")


def _env(objects, deployment: str) -> dict[str, str]:
    pod = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == deployment)
    return {e["name"]: e.get("value") for e in pod["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_data_roots_reach_the_controller_and_every_worker():
    objects = render_chart({"controller": {"dataRoots": ["/data", "/mnt/datasets"]}})
    for name in READERS:
        assert _env(objects, name)["CROPI_DATA_ROOTS"] == "/data:/mnt/datasets", name


def test_by_default_no_local_path_is_readable():
    objects = render_chart()
    for name in READERS:
        assert _env(objects, name)["CROPI_DATA_ROOTS"] == "", name


@pytest.mark.parametrize("roots", [["data"], ["/a:/b"], ["/a", "/a"]])
def test_the_schema_refuses_data_roots_that_cannot_work(roots):
    with pytest.raises(HelmError, match="dataRoots"):
        render_chart({"controller": {"dataRoots": roots}})


def test_controller_replicas_roll_and_share_a_lease_ttl():
    objects = render_chart({"controller": {"replicas": 2, "leaseTtlSeconds": 30}})
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == READERS[0])
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert _env(objects, READERS[0])["CROPI_LEASE_TTL_S"] == "30"
    assert _env(objects, READERS[0])["CROPI_JOB_RETENTION_S"] == "604800"  # 7 days by default

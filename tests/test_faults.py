"""Faults injected into a running multi-process job; each time the job still
finishes with the same selections as an undisturbed `cropi run`, and no
training step is done twice."""

import threading

from cropi.runtime.jobs import JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.s3store import S3Store

from .netutil import TcpProxy
from .services import JOB, LocalCluster, stored_selections, submit


def finished_like_reference(cluster, store, reference, redis_server):
    status = cluster.wait_phase(JOB["name"])
    assert status["phase"] == "done", status
    assert stored_selections(store, JOB["name"]) == stored_selections(reference / "store", JOB["name"])
    counts = JobRegistry(redis_server.client()).step_counts(JOB["name"])
    assert counts == {step: 1 for step in range(1, 7)}, f"steps done more than once (or lost): {counts}"


def test_a_projector_killed_mid_task_is_replaced_and_its_task_redone(cluster, embedded_reference, tmp_path,
                                                                     redis_server):
    cluster.start_all()
    bus = TaskBus(redis_server.client())
    submit(cluster)
    # Wait until the projector holds a task it has not finished, then kill it.
    cluster.wait_phase(JOB["name"], until=lambda st: bus.depth("project")["pending"] > 0)
    cluster.kill("projector")
    cluster.start("projector", name="projector-2")  # reclaims after the visibility timeout
    finished_like_reference(cluster, tmp_path / "store", embedded_reference, redis_server)


def test_a_controller_killed_mid_stage_resumes_where_it_was(cluster, embedded_reference, tmp_path, redis_server):
    cluster.start_all()
    submit(cluster)
    cluster.wait_phase(JOB["name"], until=lambda st: st.get("phase") == "train" and st.get("step", 0) >= 1)
    cluster.kill("controller")
    cluster.start("controller")
    finished_like_reference(cluster, tmp_path / "store", embedded_reference, redis_server)


def test_a_redis_restart_mid_job_loses_nothing(cluster, embedded_reference, tmp_path, redis_server):
    cluster.start_all()
    submit(cluster)
    cluster.wait_phase(JOB["name"], until=lambda st: st.get("phase") == "train" and st.get("step", 0) >= 1)
    redis_server.stop()  # SIGTERM: the AOF is flushed; services see connection errors and retry
    redis_server.start()
    finished_like_reference(cluster, tmp_path / "store", embedded_reference, redis_server)


def test_the_object_store_unreachable_for_ten_seconds_is_ridden_out(redis_server, moto_server, embedded_reference,
                                                                    tmp_path, tiny_model):
    proxy = TcpProxy(moto_server.port)
    env = {"CROPI_S3_ENDPOINT": proxy.endpoint, "CROPI_S3_ACCESS_KEY": "testing", "CROPI_S3_SECRET_KEY": "testing"}
    cluster = LocalCluster(redis_server, "s3://fault-bucket/cropi", tmp_path / "logs", env=env)
    try:
        cluster.start_all()
        submit(cluster)
        cluster.wait_phase(JOB["name"], until=lambda st: st.get("phase") in ("project", "train"))
        proxy.cut()
        threading.Timer(10.0, proxy.restore).start()
        store = S3Store(moto_server.endpoint, "fault-bucket", "testing", "testing", prefix="cropi")
        finished_like_reference(cluster, store, embedded_reference, redis_server)
    finally:
        cluster.stop_all()

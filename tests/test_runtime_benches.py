"""The runtime benchmarks check guarantees, not speed: under random consumer
kills no task is lost and every result is kept once; the API answers every
concurrent request. (Throughput and latency figures: docs/performance.md.)"""

from cropi.bench.api import run_api_bench
from cropi.bench.queue import run_queue_bench


def test_queue_bench_loses_nothing_and_keeps_each_result_once_under_kills():
    report = run_queue_bench(tasks=1000, consumers=2, kill_every_s=0.3, visibility_s=0.5)
    assert report["kills"] >= 1, "the benchmark must actually kill consumers"
    assert report["lost"] == 0 and report["wrong_results"] == 0
    assert report["results_kept_twice"] == 0
    assert report["dead_letters"] == 0
    assert report["tasks_per_s"] > 0


def test_api_bench_answers_every_concurrent_request():
    report = run_api_bench(requests=20, rounds=1)
    assert report["status"]["errors"] == 0 and report["healthz"]["errors"] == 0
    assert report["status"]["p99_ms"] >= report["status"]["p50_ms"] > 0

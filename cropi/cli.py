"""The `cropi` command line (docs/design.md §4).

Exit codes: 0 ok, 2 bad input (one message naming what is wrong, no
traceback), 1 anything else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cropi.client import ControllerError
from cropi.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="cropi: influence-guided curriculum RL (CROPI).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, reported as ratios against baselines measured in the same run.")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)


@app.command()
def run(
    job: Path = typer.Argument(..., help="job spec YAML"),
    out: Path | None = typer.Option(None, "--out", help="run folder (default: runs/<job name>)"),
    restart: bool = typer.Option(False, "--restart", help="discard this job's earlier progress in the run folder"),
) -> None:
    """Run a job embedded on this machine and write its run folder.

    Running the same job into the same folder again continues where it
    stopped (a killed run resumes after its last completed step).
    """
    from cropi.curriculum.runner import clear_progress, run_job
    from cropi.spec import load_spec

    spec = load_spec(job)
    run_dir = out or Path("runs") / spec.name
    if restart:
        clear_progress(spec, run_dir)
    result = run_job(spec, run_dir, console)
    table = Table(title=f"{spec.name}: validation accuracy")
    table.add_column("set")
    table.add_column("kind")
    table.add_column("greedy before", justify="right")
    table.add_column("greedy after", justify="right")
    table.add_column("change", justify="right")
    table.add_column("sampled before", justify="right")
    table.add_column("sampled after", justify="right")
    for name, before in result.before.items():
        after = result.after[name]
        kind = "targeted" if name in result.targeted else "untargeted"
        b, a = before["accuracy"], after["accuracy"]
        sb, sa = before.get("sampled_accuracy"), after.get("sampled_accuracy")
        table.add_row(
            name, kind, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}",
            "-" if sb is None else f"{sb:.3f}", "-" if sa is None else f"{sa:.3f}",
        )
    console.print(table)
    if len(result.stages) > 1 or spec.curriculum.selector != "full":
        from cropi.inspection import histogram_line, inspect_run

        stages = Table(title=f"stages ({spec.curriculum.selector}): targeted greedy / sampled accuracy")
        for col in ("stage", "eligible", "selected", "before", "after", "note"):
            stages.add_column(col, justify="left" if col == "note" else "right")
        for st in result.stages:
            stages.add_row(str(st["stage"]), str(st["eligible"]), str(st["selected"]),
                           _targeted(st["before"], result.targeted), _targeted(st["after"], result.targeted),
                           st["note"])
        console.print(stages)
        console.print("selected / eligible per stage:")
        for report in inspect_run(run_dir)["stages"]:
            console.print(f"  stage {report['stage']}  {histogram_line(report)}", highlight=False)
        console.print(f"(the prompts themselves: cropi inspect {run_dir})")
    console.print(
        f"{result.steps} steps in {result.wallclock_s / 60:.1f} min; run folder: {result.run_dir} "
        "(spec.yaml, metrics.jsonl, checkpoint/, tb/, curves.png)"
    )


def _targeted(results: dict[str, dict[str, float]], targeted: list[str]) -> str:
    from cropi.evaluation import targeted_mean

    return f"{targeted_mean(results, targeted):.3f} / {targeted_mean(results, targeted, 'sampled_accuracy'):.3f}"


@app.command()
def inspect(
    run_dir: Path = typer.Argument(..., help="a run folder written by `cropi run`"),
    stage: int | None = typer.Option(None, "--stage", help="only this stage (default: every stage)"),
    top: int = typer.Option(10, "--top", min=0, help="chosen prompts listed per stage"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (every chosen prompt)"),
) -> None:
    """What each stage selected: prompts, pass rates, scores, metadata histograms, overlap between stages."""
    from cropi.inspection import inspect_run

    report = inspect_run(run_dir, stage)
    if as_json:
        print(json.dumps(report))
        return
    console.print(f"[bold]{report['job']}[/]: selector {report['selector']}, pool {report['pool']} prompts")
    for st in report["stages"]:
        overlap = st.get("overlap_with_previous")
        console.rule(f"stage {st['stage']}: {st['selected']} selected of {st['eligible']} eligible"
                     + (f"; {overlap['shared']} shared with stage {st['stage'] - 1} (Jaccard {overlap['jaccard']:.2f})"
                        if overlap else ""))
        if st["note"]:
            console.print(st["note"])
        for key, hist in st["histograms"].items():
            table = Table(title=f"{key}: selected vs eligible")
            for col in (key, "selected", "eligible", "share of selection"):
                table.add_column(col, justify="left" if col == key else "right")
            for value, c in sorted(hist.items(), key=lambda kv: -kv[1]["selected"]):
                share = c["selected"] / st["selected"] if st["selected"] else 0.0
                table.add_row(value, str(c["selected"]), str(c["eligible"]), f"{share:.0%}")
            console.print(table)
        if top:
            table = Table(title=f"first {min(top, len(st['prompts']))} chosen prompts (selector order)")
            for col in ("id", "prompt", "pass rate", "score", "meta"):
                table.add_column(col, justify="right" if col in ("pass rate", "score") else "left")
            for p in st["prompts"][:top]:
                table.add_row(p["id"], Text(p["text"]), _fmt_opt(p["pass_rate"]), _fmt_opt(p["score"]), p["meta"])
            console.print(table)


def _fmt_opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="a run folder written by `cropi run`")) -> None:
    """Redraw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl."""
    from cropi.plotting import plot_run

    console.print(f"wrote {plot_run(run_dir)}")


@bench_app.command("grpo")
def bench_grpo(
    job: Path = typer.Option(Path("examples/arith.yaml"), "--job", help="job spec whose model/data/rl settings are used"),
    steps: int = typer.Option(100, "--steps", min=1, help="GRPO steps per seed"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="number of seeds (0..N-1)"),
    out: Path = typer.Option(Path("bench-out/grpo"), "--out", help="folder for the per-seed runs"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Targeted validation accuracy before vs after N GRPO steps, per seed."""
    from cropi.bench.grpo import run_grpo_bench

    report = run_grpo_bench(job, steps, seeds, out, console=err_console if as_json else console)
    if as_json:
        print(json.dumps(report))


CONTROLLER_OPTION = typer.Option(None, "--controller", help="controller URL (default: CROPI_CONTROLLER)")
TERMINAL_PHASES = ("done", "failed", "cancelled")


def _client(controller: str | None):
    from cropi.client import ControllerClient

    return ControllerClient(controller)


def _status_line(st: dict) -> str:
    metrics = " ".join(f"{k}={v:.3f}" for k, v in st.get("metrics", {}).items())
    return (f"{st['name']}: {st['phase']} (stage {st['stage'] + 1 if st['phase'] not in ('queued', 'offline') else '-'}"
            f"/{st['stages']}, step {st['step']}/{st['total_steps']}){' ' + metrics if metrics else ''}"
            f"{' error: ' + st['error'] if st.get('error') else ''}")


@app.command()
def submit(
    job: Path = typer.Argument(..., help="job spec YAML"),
    wait: bool = typer.Option(False, "--wait", help="follow the job's events until it finishes"),
    controller: str | None = CONTROLLER_OPTION,
) -> None:
    """Submit a job to the controller (validated here first, then by the controller)."""
    from cropi.spec import load_spec

    spec = load_spec(job)
    client = _client(controller)
    st = client.submit(spec.to_yaml())
    console.print(f"submitted {st['name']} ({st['phase']})")
    if wait:
        _follow(client, st["name"])
        final = client.status(st["name"])
        console.print(_status_line(final))
        if final["phase"] != "done":
            raise typer.Exit(1)


@app.command()
def status(
    job: str | None = typer.Argument(None, help="job name (default: all jobs)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    controller: str | None = CONTROLLER_OPTION,
) -> None:
    """Phase, stage, step and latest metrics of a job (or of all jobs)."""
    client = _client(controller)
    result = client.status(job) if job else client.list()
    if as_json:
        print(json.dumps(result))
        return
    for st in [result] if job else result:
        console.print(_status_line(st))


@app.command("list")
def list_jobs(controller: str | None = CONTROLLER_OPTION) -> None:
    """All jobs the controller knows, oldest first."""
    table = Table(title="jobs")
    for col in ("name", "phase", "stage", "step", "metrics"):
        table.add_column(col)
    for st in _client(controller).list():
        table.add_row(st["name"], st["phase"], f"{st['stage']}/{st['stages']}", f"{st['step']}/{st['total_steps']}",
                      " ".join(f"{k}={v:.3f}" for k, v in st["metrics"].items()))
    console.print(table)


@app.command()
def cancel(job: str = typer.Argument(...), controller: str | None = CONTROLLER_OPTION) -> None:
    """Ask the controller to cancel a job (workers stop at their next step)."""
    st = _client(controller).cancel(job)
    console.print(f"{job}: cancel requested ({st['phase']})")


@app.command()
def logs(
    job: str = typer.Argument(...),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events until the job ends"),
    controller: str | None = CONTROLLER_OPTION,
) -> None:
    """The job's events (submitted, stages, selections, evaluations, failures)."""
    client = _client(controller)
    if follow:
        _follow(client, job)
    else:
        for ev in client.events(job):
            _print_event(ev)


def _print_event(ev: dict) -> None:
    import datetime

    stamp = datetime.datetime.fromtimestamp(ev["time"]).strftime("%H:%M:%S")
    console.print(f"{stamp} {ev['kind']:<14} {ev['message']}", highlight=False)


def _follow(client, job: str) -> None:
    after = "0-0"
    while True:
        for ev in client.events(job, after=after, wait_ms=2000):
            _print_event(ev)
            after = ev["id"]
        if client.status(job)["phase"] in TERMINAL_PHASES:
            for ev in client.events(job, after=after):
                _print_event(ev)
            return


@app.command()
def serve(
    service: str = typer.Argument(..., help="controller | rollout | projector | trainer"),
    redis_url: str | None = typer.Option(None, "--redis", help="Redis URL (default: CROPI_REDIS_URL)"),
    store_url: str | None = typer.Option(None, "--store", help="folder or s3://bucket/prefix (default: CROPI_STORE)"),
    host: str = typer.Option("127.0.0.1", "--host", help="controller: address to listen on"),
    port: int = typer.Option(8080, "--port", help="controller: port to listen on"),
    consumer: str | None = typer.Option(None, "--name", help="worker name (default: <service>-<hostname>-<pid>)"),
    visibility_timeout: float = typer.Option(60.0, "--visibility-timeout", min=0.1,
                                             help="seconds of worker silence before its task is reclaimed"),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="deliveries before a task is dead-lettered"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="workers: serve Prometheus /metrics here"),
    parallel: int = typer.Option(1, "--parallel", min=1,
                                 help="workers: tasks run at once (a projector feeding a Ray pool: its actors)"),
) -> None:
    """Start one service (what the containers run; the tests start them as processes).

    A worker runs the tasks of `executor: inline` jobs itself and hands those of
    `executor: ray` jobs to Ray (the projection pool, the Ray Serve rollout
    service, Ray Train), joining the job's `ray.address` or RAY_ADDRESS.
    """
    import logging
    import os
    import signal
    import socket
    import threading

    from cropi.runtime.config import open_store, redis_client
    from cropi.runtime.jobs import JobRegistry
    from cropi.runtime.queue import TaskBus

    services = ("controller", "rollout", "projector", "trainer")
    if service not in services:
        raise InputError(f"serve: unknown service {service!r} (choose from {', '.join(services)})")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service} %(levelname)s %(message)s")
    client = redis_client(redis_url)
    store = open_store(store_url)
    bus = TaskBus(client, visibility_timeout_s=visibility_timeout, max_attempts=max_attempts)
    jobs = JobRegistry(client)
    if service == "controller":
        import importlib

        token = os.environ.get("CROPI_TOKEN", "")
        if not token and os.environ.get("CROPI_TOKEN_FILE"):
            token = open(os.environ["CROPI_TOKEN_FILE"]).read().strip()
        # The HTTP layer lives in services/ (deployable code); the library does not depend on it.
        api = importlib.import_module("services.controller.api")
        api.serve(host, port, bus, jobs, store, token)
        return
    from cropi.curriculum.workers import SERVICE_KINDS, Worker

    name = consumer or f"{service}-{socket.gethostname()}-{os.getpid()}"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = None
    if metrics_port:
        from cropi.runtime.metrics import WorkerMetrics

        metrics = WorkerMetrics(bus, SERVICE_KINDS[service])
        metrics.serve(metrics_port, host)
    err_console.print(f"{service} worker {name}: consuming {', '.join(SERVICE_KINDS[service])} tasks")
    worker = Worker(SERVICE_KINDS[service], bus, jobs, store, name, metrics=metrics, parallel=parallel)
    try:
        worker.run(stop)
    finally:
        worker.close()


@bench_app.command("testbed")
def bench_testbed(
    job: Path = typer.Option(Path("examples/arith.yaml"), "--job", help="job spec whose model/data/rl settings are used"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="number of seeds (0..N-1)"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="GRPO steps per arm (default: full's budget "
                                                                  "in `cropi bench acceleration`)"),
    out: Path = typer.Option(Path("bench-out/testbed"), "--out", help="folder for the runs and testbed.json"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Selector-free check that the testbed behaves like real RLVR (greedy rises, latent capability, ...)."""
    from cropi.bench.testbed import print_verdict, run_testbed_bench

    report = run_testbed_bench(job, seeds, out, err_console if as_json else console, steps)
    if as_json:
        print(json.dumps(report))
    else:
        print_verdict(report, console)


@bench_app.command("acceleration")
def bench_acceleration(
    job: Path = typer.Option(Path("examples/arith.yaml"), "--job", help="job spec whose model/data/rl settings are used"),
    seeds: int | None = typer.Option(None, "--seeds", min=2, help="paired seeds 0..N-1 (default 5; 2 with --quick)"),
    quick: bool = typer.Option(False, "--quick", help="smoke-sized run (<= 10 min): 2 seeds, small pool and schedule"),
    selector: list[str] | None = typer.Option(None, "--selector", help="run only these selectors (repeat; full is required)"),
    metric: str = typer.Option("accuracy", "--metric",
                               help="accuracy (greedy) or sampled_accuracy (avg@k at the rollout temperature)"),
    out: Path = typer.Option(Path("bench-out/acceleration"), "--out", help="folder for the runs, acceleration.json/png"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Steps and wall-clock each selector needs to reach full-dataset GRPO's targeted accuracy (docs/design.md §9)."""
    from cropi.bench.acceleration import run_acceleration_bench

    if metric not in ("sampled_accuracy", "accuracy"):
        raise InputError(f"--metric: {metric!r} is not one of sampled_accuracy, accuracy")
    report = run_acceleration_bench(job, out, err_console if as_json else console, seeds=seeds, quick=quick,
                                    selectors=selector, metric=metric)
    if as_json:
        print(json.dumps(report))


@bench_app.command("pool")
def bench_pool(
    actors: int = typer.Option(2, "--actors", min=2, help="pool size compared with a 1-actor pool"),
    out: Path = typer.Option(Path("bench-out/pool"), "--out", help="folder for pool.json"),
    pool_size: int = typer.Option(2048, "--pool-size", min=1, help="prompts projected per run"),
    model: str = typer.Option("builtin:tiny-arith", "--model", help="model path (builtin:, folder or hub id)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Parts/s of the Ray projection pool with 1 actor vs --actors (goal: 1.7x with 2), on local Ray."""
    from cropi.bench.pool import run_pool_bench

    report = run_pool_bench(out, actors=actors, model=model, pool_size=pool_size)
    _print_report(report, as_json, "projection pool scaling (parts/s, ratio measured in this run)")


@bench_app.command("queue")
def bench_queue(
    tasks: int = typer.Option(10_000, "--tasks", min=1),
    consumers: int = typer.Option(4, "--consumers", min=1),
    kill_every: float = typer.Option(0.5, "--kill-every", min=0.05, help="seconds between consumer SIGKILLs"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Tasks through consumer processes killed at random: none lost, results exactly once, tasks/s."""
    from cropi.bench.queue import run_queue_bench

    report = run_queue_bench(tasks=tasks, consumers=consumers, kill_every_s=kill_every)
    _print_report(report, as_json, "task bus under random consumer kills")


@bench_app.command("api")
def bench_api(
    requests: int = typer.Option(200, "--requests", min=1, help="concurrent status requests per round"),
    rounds: int = typer.Option(3, "--rounds", min=1),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """p50/p99 of concurrent status requests to a controller process (baseline: /healthz)."""
    from cropi.bench.api import run_api_bench

    report = run_api_bench(requests=requests, rounds=rounds)
    _print_report(report, as_json, "controller API latency")


@bench_app.command("projection")
def bench_projection(
    dim: int = typer.Option(50_000_000, "--dim", min=1000, help="coordinates in the projected buffer"),
    proj_dim: int = typer.Option(8192, "--proj-dim", min=1, help="k, the projected dimension"),
    sparse_ratio: float = typer.Option(0.1, "--sparse-ratio", min=1e-6, max=1.0),
    repeats: int = typer.Option(5, "--repeats", min=1),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """ns per coordinate of cropi's projector vs a memory pass, scikit-learn and a dense Gaussian."""
    from cropi.bench.projection import run_projection_bench

    report = run_projection_bench(dim=dim, k=proj_dim, sparse_ratio=sparse_ratio, repeats=repeats)
    _print_report(report, as_json, "projection benchmark (ns per coordinate, ratios measured in this run)")


@bench_app.command("popi")
def bench_popi(
    hidden: int = typer.Option(512, "--hidden", min=8),
    layers: int = typer.Option(8, "--layers", min=1),
    group: int = typer.Option(8, "--group", min=2, help="responses per prompt"),
    response_len: int = typer.Option(256, "--response-len", min=1),
    proj_dim: int = typer.Option(8192, "--proj-dim", min=1),
    sparse_ratio: float = typer.Option(0.1, "--sparse-ratio", min=1e-6, max=1.0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Time and peak memory of a projected POPI gradient vs a plain backward of the same batch."""
    from cropi.bench.popi import run_popi_bench

    report = run_popi_bench(hidden=hidden, layers=layers, group=group, response_len=response_len,
                            proj_dim=proj_dim, sparse_ratio=sparse_ratio)
    _print_report(report, as_json, "POPI gradient + projection vs plain backward")


@bench_app.command("precision")
def bench_precision(
    model: str = typer.Option("builtin:tiny-arith", "--model", help="model path (as in a job spec)"),
    pool_size: int = typer.Option(400, "--pool-size", min=10),
    valid_size: int = typer.Option(100, "--valid-size", min=2),
    seeds: int = typer.Option(3, "--seeds", min=1, help="projector seeds per setting"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Precision@10% of the projected selection against exact gradients, over sparse_ratio x proj_dim."""
    from cropi.bench.precision import run_precision_bench

    report = run_precision_bench(model_path=model, pool_size=pool_size, valid_size=valid_size, seeds=seeds)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"precision@{report['select_ratio']:.0%} vs exact gradients (d={report['d']}, "
                        f"{report['eligible_pool']} eligible prompts)")
    dims = sorted({g["proj_dim"] for g in report["grid"]})
    table.add_column("sparse_ratio \\ k")
    for k in dims:
        table.add_column(str(k), justify="right")
    for ratio in sorted({g["sparse_ratio"] for g in report["grid"]}):
        cells = {g["proj_dim"]: g for g in report["grid"] if g["sparse_ratio"] == ratio}
        table.add_row(str(ratio), *(f"{cells[k]['precision_mean']:.2f}±{cells[k]['precision_std']:.2f}" for k in dims))
    console.print(table)
    console.print(f"recommended: {report['recommended']}")


def _print_report(report: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    def rows(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                rows(f"{prefix}{key}.", value)
            else:
                table.add_row(prefix + key, f"{value:.4g}" if isinstance(value, float) else str(value))

    rows("", report)
    console.print(table)


def main() -> None:
    try:
        app(standalone_mode=False)
    except ControllerError as err:
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), highlight=False, soft_wrap=True)
        sys.exit(1)
    except InputError as err:
        # The message may contain brackets (field paths, lists): print it verbatim.
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exit_:
        code = getattr(exit_, "exit_code", getattr(exit_, "code", 0))
        sys.exit(code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except Exception as err:
        # Usage errors (unknown command, bad option) come from click, which
        # typer may vendor: recognise them by their interface, exit code 2.
        show, code = getattr(err, "show", None), getattr(err, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise


if __name__ == "__main__":
    main()

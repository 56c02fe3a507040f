"""`cropi bench ...`: the benchmarks, each reported as ratios against a baseline measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cropi.errors import InputError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, reported as ratios against baselines measured in the same run.")
console = Console()
err_console = Console(stderr=True)


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
    batched: bool = typer.Option(False, "--batched", help="instead: batched POPI vs the per-prompt loop on --job"),
    job: Path = typer.Option(Path("examples/arith.yaml"), "--job", help="with --batched: the job's model, data and "
                             "influence settings"),
    prompts: int = typer.Option(400, "--prompts", min=2, help="with --batched: pool prompts sampled offline"),
    batch_tokens: int | None = typer.Option(None, "--batch-tokens", min=1,
                                            help="with --batched: tokens per pass (default: the job's)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Time and peak memory of a projected POPI gradient vs a plain backward of the same batch
    (--batched: throughput of batched POPI vs one backward per prompt, same vectors)."""
    if batched:
        from cropi.bench.popi_batched import run_batched_popi_bench

        report = run_batched_popi_bench(job=job, prompts=prompts, batch_tokens=batch_tokens)
        _print_report(report, as_json, "batched POPI vs the per-prompt loop (ratios measured in this run)")
        return
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
    options = Table(title="cheaper scoring at k=8192, sparse_ratio 1.0: precision@10% vs exact full gradients")
    for column in ("option", "precision", "spearman"):
        options.add_column(column, justify="left" if column == "option" else "right")
    for row in report["options"]:
        rho = f"{row['spearman_mean']:.2f}" if "spearman_mean" in row else "-"
        options.add_row(row["option"], f"{row['precision_mean']:.2f}±{row['precision_std']:.2f}", rho)
    console.print(options)


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

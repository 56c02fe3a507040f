"""The `cropi` command line (docs/design.md §4): embedded runs, their
inspection, the controller's client and the benchmarks. The installed
`cropi` command adds `cropi serve` (`services/cli.py`), which starts the
deployable services; the library itself never imports them.

Exit codes: 0 ok, 2 bad input (one message naming what is wrong, no
traceback), 1 anything else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

import cropi
from cropi.bench.commands import bench_app
from cropi.client import ControllerError
from cropi.errors import InputError
from cropi.runtime.jobs import TERMINAL, Phase

_option_type = typer.core.TyperOption.display_type_rich


def _flag_type(self, ctx) -> str | None:
    """No value placeholder for a flag: typer 0.29's help shows `--restart <bool>` otherwise."""
    return None if self.is_flag else _option_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type

app = typer.Typer(add_completion=False, no_args_is_help=True, help="cropi: influence-guided curriculum RL (CROPI).")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)
SET_OPTION = typer.Option(None, "--set", metavar="PATH=VALUE", help="change a spec field before validation, e.g. "
                          "--set rl.lr=1e-5 --set data.validation.0.size=8 (repeatable)")


def _show_version(value: bool) -> None:
    if value:
        print(f"cropi {cropi.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="print cropi's version and exit")) -> None:
    """cropi: influence-guided curriculum RL (CROPI)."""


@app.command()
def run(
    job: Path = typer.Argument(..., help="job spec YAML"),
    out: Path | None = typer.Option(None, "--out", help="run folder (default: runs/<job name>)"),
    restart: bool = typer.Option(False, "--restart", help="discard this job's earlier progress in the run folder"),
    sets: list[str] | None = SET_OPTION,
) -> None:
    """Run a job embedded on this machine and write its run folder.

    Running the same job into the same folder again continues where it
    stopped (a killed run resumes after its last completed step).
    """
    from cropi.data.rewards import import_reward_functions
    from cropi.embedded import clear_progress, run_job
    from cropi.spec_overrides import load_spec_with

    spec = load_spec_with(job, sets)
    import_reward_functions(spec, str(job))  # the user's own code, on their machine: a typo fails now
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


@app.command()
def validate(
    job: Path = typer.Argument(..., help="job spec YAML"),
    out: Path | None = typer.Option(None, "--out", help="run folder `cropi run` would use (default: runs/<job name>)"),
    sets: list[str] | None = SET_OPTION,
) -> None:
    """Check a job as `cropi run` does, without running it, and print what it will cost.

    Checked: the spec (with --set), the device, reward code, the model path (nothing built), the
    data, the run folder."""
    from cropi.curriculum.controller import cached_job_data, check_job
    from cropi.data.rewards import import_reward_functions
    from cropi.devices import resolve_device
    from cropi.embedded import check_run_dir
    from cropi.estimate import estimate, estimate_lines
    from cropi.spec_overrides import load_spec_with

    spec = load_spec_with(job, sets)
    import_reward_functions(spec, str(job))
    device = resolve_device(spec.device)
    check_job(spec)  # the model path (nothing built) and the data
    check_run_dir(spec, out or Path("runs") / spec.name)
    console.print(f"[bold]{spec.name}[/]: valid ({spec.curriculum.selector}, {spec.curriculum.stages} stages, "
                  f"device {device})")
    for line in estimate_lines(estimate(spec, cached_job_data(spec), device.type)):
        console.print(f"  {line}", highlight=False)


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
        samples = [(f"offline {s['id']}", r["text"], r["reward"]) for s in st["offline_samples"] for r in s["responses"]]
        samples += [(f"step {s['step']}", s["response"], s["reward"]) for s in st["training_samples"]]
        if samples:
            table = Table(title="what the model said (decoded samples)")
            for col in ("where", "response", "reward"):
                table.add_column(col, justify="right" if col == "reward" else "left")
            for where, text, value in samples:
                table.add_row(where, Text(text), f"{value:.2f}")
            console.print(table)


def _fmt_opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command()
def plot(run_dir: Path = typer.Argument(..., help="a run folder written by `cropi run`")) -> None:
    """Redraw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl."""
    from cropi.plotting import plot_run

    console.print(f"wrote {plot_run(run_dir)}")


CONTROLLER_OPTION = typer.Option(None, "--controller", help="controller URL (default: CROPI_CONTROLLER)")


def _client(controller: str | None):
    from cropi.client import ControllerClient

    return ControllerClient(controller)


def _status_line(st: dict) -> str:
    metrics = " ".join(f"{k}={v:.3f}" for k, v in st.get("metrics", {}).items())
    return (f"{st['name']}: {st['phase']} (stage {st['stage'] + 1 if st['phase'] not in (Phase.QUEUED, Phase.OFFLINE) else '-'}"
            f"/{st['stages']}, step {st['step']}/{st['total_steps']}){' ' + metrics if metrics else ''}"
            f"{' error: ' + st['error'] if st.get('error') else ''}")


@app.command()
def submit(
    job: Path = typer.Argument(..., help="job spec YAML"),
    wait: bool = typer.Option(False, "--wait", help="follow the job's events until it finishes"),
    controller: str | None = CONTROLLER_OPTION,
    sets: list[str] | None = SET_OPTION,
) -> None:
    """Submit a job to the controller (validated here first, then by the controller)."""
    from cropi.spec_overrides import load_spec_with

    spec = load_spec_with(job, sets)
    client = _client(controller)
    st = client.submit(spec.to_yaml())
    if st["phase"] in (Phase.FAILED, Phase.CANCELLED):
        # The same spec was submitted before and that job has ended without finishing: saying
        # "submitted" and exiting 0 would hide that nothing runs.
        err_console.print(Text.assemble(("error: ", "bold red"), f"job {st['name']} was submitted before and is "
                                        f"{st['phase']}{': ' + st['error'] if st.get('error') else ''}. "
                                        f"`cropi resume {st['name']}` continues a failed job; a new name starts over"),
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"submitted {st['name']} ({st['phase']})")
    if wait:
        _follow(client, st["name"])
        final = client.status(st["name"])
        console.print(_status_line(final))
        if final["phase"] != Phase.DONE:
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


@app.command()
def fetch(
    job: str = typer.Argument(..., help="job name"),
    out: Path | None = typer.Option(None, "--out", help="run folder to write (default: runs/<job name>)"),
    controller: str | None = CONTROLLER_OPTION,
) -> None:
    """Download a job's results into a run folder that `cropi plot` and `cropi inspect` read.

    The final checkpoint, metrics, summary, curves, selections, spec and events, through the
    controller (its token and tenancy apply); what the job has not stored yet is named."""
    from cropi.fetch import fetch_job

    r = fetch_job(_client(controller), job, out, console)
    console.print(f"fetched {r.files} files ({r.bytes / 1e6:.1f} MB) of {job} ({r.phase}) into {r.run_dir}")
    for note in r.notes:
        console.print(f"  {note}", highlight=False)
    if r.missing:
        console.print(f"  not stored (yet): {', '.join(r.missing)}", highlight=False)


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
def resume(job: str = typer.Argument(...), controller: str | None = CONTROLLER_OPTION) -> None:
    """Continue a failed job from the start of the stage it failed in (what is stored is not redone)."""
    st = _client(controller).resume(job)
    console.print(f"{job}: continuing ({st['phase']}, stage {st['stage'] + 1}/{st['stages']})")


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
        if client.status(job)["phase"] in TERMINAL:
            for ev in client.events(job, after=after):
                _print_event(ev)
            return


def main() -> None:
    run_app(app)


def run_app(typer_app: typer.Typer) -> None:
    """Run a command line with cropi's exit codes and one-line error messages."""
    try:
        # Without standalone mode, click answers `raise typer.Exit(n)` by returning n.
        code = typer_app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
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

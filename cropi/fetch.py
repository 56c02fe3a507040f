"""`cropi fetch JOB`: a cluster job's results, through the controller API, into a run folder.

The folder is laid out like one `cropi run` writes, so that `cropi plot` and
`cropi inspect` read it as they read a local run:

    DIR/spec.yaml                        the job's spec (its name is the job's key: <tenant>.<name> or <name>)
    DIR/metrics.jsonl, summary.json, curves.png   the job's report (what it wrote at its last stage end)
    DIR/checkpoint/                      the final policy, an HF folder (usable as model.path)
    DIR/events.jsonl                     the event archive (written when the job ended)
    DIR/store/jobs/<key>/...             spec, events, selections, stage records, pool offline trajectories,
                                         under their store keys (checksummed, as `cropi inspect` reads them)

What the job has not written yet (a running job's final checkpoint, a report
an older controller does not write) is missing and named. Without the
report's metrics.jsonl, the stages' stored step records make it, and
curves.png is drawn from them. A folder holding another job's spec is
refused, as `cropi run` refuses it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cropi.client import ControllerClient
from cropi.curriculum import layout
from cropi.embedded import check_run_dir
from cropi.errors import InputError
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec_yaml



def _rel(key_of, *args) -> str:
    """A job's store key relative to the job's prefix (what the artifacts API names)."""
    return key_of("j", *args)[len(layout.job_prefix("j")):]


REPORT = {_rel(layout.report_key, name): name for name in ("metrics.jsonl", "summary.json", "curves.png")}
CHECKPOINT = _rel(layout.final_checkpoint_prefix) + "/"
SPEC, EVENTS = _rel(layout.spec_key), _rel(layout.events_key)
STAGES = _rel(layout.stage_prefix, 0).rpartition("/")[0] + "/"
# Also kept under store/ with their keys (what `cropi inspect` reads): all but the report and the checkpoint.
STORED = (SPEC, EVENTS, STAGES, _rel(layout.offline_prefix) + "/")


@dataclass
class FetchResult:
    run_dir: Path
    phase: str
    files: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)  # what the job has not written (yet)
    notes: list[str] = field(default_factory=list)  # what fetch made instead


def fetch_job(client: ControllerClient, job: str, out: Path | None, console: Console) -> FetchResult:
    listing = client.artifacts(job)
    sizes = {a["path"]: a["size"] for a in listing["artifacts"]}
    if SPEC not in sizes:
        raise InputError(f"job {job}: the controller lists no stored spec for it; nothing to fetch")
    run_dir = out or Path("runs") / job
    with tempfile.TemporaryDirectory(prefix=".cropi-fetch-") as tmp:
        spec_file = Path(tmp) / "spec.yaml"
        client.download(job, SPEC, spec_file)
        spec = parse_spec_yaml(spec_file.read_text(), f"the stored spec of job {job}")
        check_run_dir(spec, run_dir)  # before anything is written there
        run_dir.mkdir(parents=True, exist_ok=True)
        result = FetchResult(run_dir, listing["phase"])
        store = LocalStore(run_dir / "store")
        root = layout.job_prefix(spec.name)
        if any(p.startswith(CHECKPOINT) for p in sizes):
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # another fetch's files may be stale
        with _Downloads(console, sum(sizes.values())) as advance:
            for path, size in sizes.items():
                target = _destination(run_dir, path) or Path(tmp) / "object"
                if path == SPEC:
                    target = spec_file  # downloaded above
                    (run_dir / "spec.yaml").write_text(spec.to_yaml())  # the text `cropi run`'s check compares
                    if advance:
                        advance(size)
                    result.bytes += spec_file.stat().st_size
                else:
                    result.bytes += client.download(job, path, target, advance)
                result.files += 1
                if path.startswith(STORED):
                    store.put(root + path, target.read_bytes())
                if not console.is_terminal:
                    console.print(f"  {path}  {_human(size)}", highlight=False)
    _missing(spec, sizes, result)
    return result


def _destination(run_dir: Path, path: str) -> Path | None:
    """Where a fetched artifact lies in the run folder (None: under store/ only)."""
    if path in REPORT:
        return run_dir / REPORT[path]
    if path.startswith(CHECKPOINT):
        return run_dir / "checkpoint" / path[len(CHECKPOINT):]
    if path == EVENTS:
        return run_dir / "events.jsonl"
    return None


def _missing(spec, sizes: dict[str, int], result: FetchResult) -> None:
    run_dir = result.run_dir
    for path in (*REPORT, EVENTS):
        if path not in sizes:
            result.missing.append(path)
    if not any(p.startswith(CHECKPOINT) for p in sizes):
        result.missing.append(CHECKPOINT)
    stages = spec.curriculum.stages
    selected = [s for s in range(stages) if _rel(layout.selection_key, s) in sizes]
    if len(selected) < stages:
        result.missing.append(f"the selections of stages {sorted(set(range(stages)) - set(selected))}")
    if _rel(layout.report_key, "metrics.jsonl") not in sizes:
        store = LocalStore(run_dir / "store")
        records = [line for s in range(stages) if _rel(layout.stage_metrics_key, s) in sizes
                   for line in store.get(layout.stage_metrics_key(spec.name, s)).decode().splitlines()
                   if line.strip()]
        if records:
            (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in records))
            result.notes.append(f"metrics.jsonl: made from the stages' step records ({len(records)} records)")
    if _rel(layout.report_key, "curves.png") not in sizes and (run_dir / "metrics.jsonl").is_file():
        from cropi.plotting import plot_run

        plot_run(run_dir)
        result.notes.append("curves.png: drawn here from metrics.jsonl")


class _Downloads:
    """A download bar on a terminal (rich); plain lines (printed by the caller) elsewhere."""

    def __init__(self, console: Console, total: int):
        self.bar = Progress(TextColumn("fetch"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            console=console) if console.is_terminal else None
        self.total = total

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.start()
        task = self.bar.add_task("fetch", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"

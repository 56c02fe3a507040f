"""What `curves.png` shows, read from a run folder (`plotting.py` draws it).

- the curves: `metrics.jsonl` (eval and train records);
- the title: the job's name and selector, from `spec.yaml`;
- where each stage starts: stage k starts where stage k-1's training steps
  end (the `stage` of each train record; a stage that trained nothing,
  seen in `summary.json` or the store, starts and ends at the same step);
- what each stage trained on: the stored selections (`store/`), counted by
  the prompts' `skill` (built-in tasks) or `data_source` (file data). The
  prompts are rebuilt from the spec, which determines them.

A folder without some of it (fetched without its store, or without its
spec, or whose data files are not here) still plots: what is missing is
left out, and `mix_note` says why.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cropi.curriculum import layout
from cropi.curriculum.controller import cached_job_data
from cropi.errors import InputError
from cropi.runtime.store import LocalStore
from cropi.spec import JobSpec, load_spec
from cropi.tracking import read_metrics

MIX_KEYS = ("skill", "data_source")  # the first that the pool's prompts carry counts a selection
UNKNOWN = "?"  # a selected id the rebuilt pool does not hold


@dataclass
class StageMix:
    stage: int
    counts: dict[str, int]  # metadata value -> selected prompts with it
    eligible: int | None = None
    note: str = ""

    @property
    def selected(self) -> int:
        return sum(self.counts.values())


@dataclass
class PlotInputs:
    title: str
    evals: dict[str, list[dict]]  # set -> its eval records, by step
    train: dict[int, list[tuple[int, float]]]  # stage -> (step, reward_mean), by step
    stage_starts: dict[int, int]  # stage -> the step count when it started
    mix_key: str | None = None  # "skill" or "data_source" (None: the prompts carry neither)
    mixes: list[StageMix] = field(default_factory=list)
    mix_note: str = ""  # why `mixes` is empty


def read_plot_inputs(run_dir: Path) -> PlotInputs:
    if not (run_dir / "metrics.jsonl").is_file():
        raise InputError(f"{run_dir} is not a cropi run folder (no metrics.jsonl)")
    evals: dict[str, list[dict]] = defaultdict(list)
    train: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in read_metrics(run_dir):
        if r["kind"] == "eval":
            evals[r["set"]].append(r)
        elif r["kind"] == "train":
            train[int(r.get("stage", 0))].append((r["step"], r["reward_mean"]))
    for pts in evals.values():
        pts.sort(key=lambda p: p["step"])
    for pts in train.values():
        pts.sort()
    spec, spec_note = _spec(run_dir)
    selections, mix_note = _selections(run_dir, spec) if spec else ({}, spec_note)
    summary = _summary_stages(run_dir)
    started = set(train) | set(selections) | set(summary)
    inputs = PlotInputs(_title(run_dir, spec), dict(evals), dict(train), stage_starts(train, started))
    if selections:
        inputs.mix_key, inputs.mixes, mix_note = _mixes(spec, selections)
    inputs.mix_note = mix_note
    return inputs


def stage_starts(train: dict[int, list[tuple[int, float]]], started: set[int]) -> dict[int, int]:
    """Stage -> the step count at its start: stage 0 at 0, each next one where the previous one's steps end."""
    starts, step = {}, 0
    for stage in range(max(started, default=-1) + 1):
        starts[stage] = step
        step += len({s for s, _ in train.get(stage, [])})
    return starts


def _spec(run_dir: Path) -> tuple[JobSpec | None, str]:
    path = run_dir / "spec.yaml"
    if not path.is_file():
        return None, "no spec.yaml in this folder"
    try:
        return load_spec(path), ""
    except (OSError, ValueError) as err:
        return None, f"spec.yaml does not load: {err}"


def _title(run_dir: Path, spec: JobSpec | None) -> str:
    if spec is None:
        return f"{run_dir.name} (no spec.yaml: job and selector unknown)"
    cur = spec.curriculum
    return (f"{spec.name} · selector {cur.selector} · {cur.stages} stage{'s' if cur.stages != 1 else ''}"
            f" × {cur.steps_per_stage} steps · pool {spec.data.pool.source}")


def _summary_stages(run_dir: Path) -> set[int]:
    try:
        return {int(s["stage"]) for s in json.loads((run_dir / "summary.json").read_text()).get("stages", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # absent (the run is still going) or unreadable: the other sources tell


def _selections(run_dir: Path, spec: JobSpec) -> tuple[dict[int, dict], str]:
    if not (run_dir / "store").is_dir():
        return {}, "this folder has no store/ (fetched without it?)"
    store = LocalStore(run_dir / "store")
    found, broken = {}, []
    for stage in range(spec.curriculum.stages):
        key = layout.selection_key(spec.name, stage)
        if not store.exists(key):
            continue
        try:
            found[stage] = json.loads(store.get(key))
        except (OSError, ValueError) as err:
            broken.append(f"stage {stage}: {err}")
    if broken and not found:
        return {}, "the stored selections do not read: " + "; ".join(broken)
    return found, "" if found else "the run has no stored selections"


def _mixes(spec: JobSpec, selections: dict[int, dict]) -> tuple[str | None, list[StageMix], str]:
    try:
        pool = cached_job_data(spec).pool
    except (OSError, ValueError) as err:
        return None, [], f"the pool could not be rebuilt from spec.yaml here: {err}"
    key = next((k for k in MIX_KEYS if any(k in p.meta for p in pool)), None)
    value = {p.id: str(p.meta.get(key, "-")) if key else "all" for p in pool}
    mixes = [StageMix(stage, dict(Counter(value.get(i, UNKNOWN) for i in rec.get("prompt_ids", []))),
                      rec.get("eligible"), rec.get("note", ""))
             for stage, rec in sorted(selections.items())]
    return key, mixes, ""

"""`cropi inspect RUN_DIR`: what each stage of a run selected, and from what.

Per stage: the chosen prompts (text, offline pass rate, the selector's
score, metadata: skill and digits for built-in tasks, `data_source` for
file data), histograms of that metadata for the selected prompts against
the eligible ones, and the overlap with the previous stage's choice.

Everything is read from the run folder: the resolved spec (`spec.yaml`),
the stored selections and offline trajectories (`store/`). The prompts are
rebuilt from the spec, which determines them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cropi.curriculum import layout
from cropi.curriculum.influence import POOL
from cropi.data.sources import JobData, load_job_data
from cropi.data.types import Prompt
from cropi.errors import InputError
from cropi.influence.offline import OfflineGroup, load_offline
from cropi.runtime.store import LocalStore
from cropi.spec import JobSpec, load_spec

META_KEYS = ("skill", "digits", "data_source")  # metadata worth a histogram, when prompts carry it


@dataclass
class RunSelections:
    spec: JobSpec
    data: JobData
    stages: dict[int, dict]  # stage -> stored selection record
    pass_rates: dict[str, float]  # pool prompt id -> offline pass rate (empty without offline data)
    eligible: set[str]  # pool prompt ids with mixed offline rewards (the whole pool without offline data)
    offline: dict[str, OfflineGroup]  # pool prompt id -> its offline responses (empty without offline data)
    store: LocalStore


def load_run_selections(run_dir: Path) -> RunSelections:
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    spec_file = run_dir / "spec.yaml"
    if not spec_file.is_file():
        raise InputError(f"{run_dir} is not a cropi run folder: it has no spec.yaml")
    spec = load_spec(spec_file)
    store = LocalStore(run_dir / "store")
    stages = {}
    for stage in range(spec.curriculum.stages):
        key = layout.selection_key(spec.name, stage)
        if store.exists(key):
            stages[stage] = json.loads(store.get(key))
    if not stages:
        raise InputError(f"{run_dir}: the run has no stored selections yet (store/{layout.selection_key(spec.name, 0).replace('/0/', '/*/')})")
    data = load_job_data(spec)
    groups = load_offline(store, layout.offline_prefix(spec.name, POOL))
    if groups:
        pass_rates = {g.prompt_id: g.pass_rate for g in groups}
        eligible = {g.prompt_id for g in groups if g.eligible}
    else:
        pass_rates, eligible = {}, {p.id for p in data.pool}
    return RunSelections(spec, data, stages, pass_rates, eligible, {g.prompt_id: g for g in groups}, store)


SAMPLE_PROMPTS = 3  # chosen prompts whose offline responses a report shows
SAMPLE_STEPS = 3  # training steps whose decoded samples a report shows


def offline_samples(run: RunSelections, ids: list[str]) -> list[dict]:
    """The decoded offline responses (and their rewards) of the first chosen prompts."""
    out = []
    for pid in ids[:SAMPLE_PROMPTS]:
        group = run.offline.get(pid)
        if group is not None and group.texts:
            out.append({"id": pid, "responses": [{"text": t, "reward": r}
                                                 for t, r in list(zip(group.texts, group.rewards))[:2]]})
    return out


def training_samples(run: RunSelections, stage: int) -> list[dict]:
    """The decoded samples the trainer recorded in the stage's first steps."""
    key = layout.stage_metrics_key(run.spec.name, stage)
    if not run.store.exists(key):
        return []
    records = [json.loads(line) for line in run.store.get(key).decode().splitlines() if line.strip()]
    return [{"step": r["step"], **sample} for r in records if r["kind"] == "samples"
            for sample in r["samples"]][: SAMPLE_STEPS * 2]


def meta_label(prompt: Prompt) -> str:
    """A one-word label of a prompt's metadata: `rev3` (skill and digits), a data_source, or '-'."""
    meta = prompt.meta
    if "skill" in meta:
        return f"{meta['skill']}{meta.get('digits', '')}"
    return str(meta.get("data_source", "-"))


def histograms(prompts: list[Prompt], eligible: list[Prompt]) -> dict[str, dict[str, dict[str, int]]]:
    """Per metadata key: value -> {"selected": n, "eligible": n}."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for key in META_KEYS:
        if not any(key in p.meta for p in eligible):
            continue
        sel = Counter(str(p.meta.get(key, "-")) for p in prompts)
        eli = Counter(str(p.meta.get(key, "-")) for p in eligible)
        out[key] = {v: {"selected": sel.get(v, 0), "eligible": eli[v]} for v in sorted(eli)}
    return out


def stage_report(run: RunSelections, stage: int) -> dict:
    if stage not in run.stages:
        known = ", ".join(map(str, sorted(run.stages)))
        raise InputError(f"--stage {stage}: out of range; this run has selections for stage(s) {known}")
    record = run.stages[stage]
    by_id = {p.id: p for p in run.data.pool}
    ids = [i for i in record["prompt_ids"] if i in by_id]
    scores = record.get("scores") or []
    chosen = [by_id[i] for i in ids]
    eligible = [p for p in run.data.pool if p.id in run.eligible]
    prompts = []
    for n, p in enumerate(chosen):
        prompts.append({"id": p.id, "text": p.text, "pass_rate": run.pass_rates.get(p.id),
                        "score": scores[n] if n < len(scores) else None, "meta": meta_label(p)})
    report = {"stage": stage, "selector": record.get("selector", run.spec.curriculum.selector),
              "selected": len(ids), "eligible": record.get("eligible", len(eligible)), "note": record.get("note", ""),
              "histograms": histograms(chosen, eligible), "prompts": prompts,
              "offline_samples": offline_samples(run, ids), "training_samples": training_samples(run, stage)}
    previous = run.stages.get(stage - 1)
    if previous is not None:
        a, b = set(previous["prompt_ids"]), set(ids)
        report["overlap_with_previous"] = {"shared": len(a & b), "of": len(b),
                                           "jaccard": len(a & b) / len(a | b) if a | b else 1.0}
    return report


def inspect_run(run_dir: Path, stage: int | None = None) -> dict:
    run = load_run_selections(run_dir)
    stages = [stage] if stage is not None else sorted(run.stages)
    return {"run_dir": str(run_dir), "job": run.spec.name, "selector": run.spec.curriculum.selector,
            "pool": len(run.data.pool), "stages": [stage_report(run, s) for s in stages]}


def histogram_line(report: dict, key: str | None = None) -> str:
    """One line: selected/eligible per metadata value, largest selected share first (`rev 180/310 · ...`)."""
    hists = report["histograms"]
    if not hists:
        return "no metadata"
    key = key or ("skill" if "skill" in hists else next(iter(hists)))
    items = sorted(hists[key].items(), key=lambda kv: (-kv[1]["selected"], kv[0]))
    return f"{key}: " + " · ".join(f"{v} {c['selected']}/{c['eligible']}" for v, c in items)

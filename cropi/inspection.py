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
from cropi.influence.offline import load_offline
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
    return RunSelections(spec, data, stages, pass_rates, eligible)


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
              "histograms": histograms(chosen, eligible), "prompts": prompts}
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

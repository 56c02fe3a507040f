"""`curves.png`, read through matplotlib's objects rather than its pixels: the title names the
job and its selector, each stage's start is a line at the step it started, no legend lies on a
data area, and the selection panel stacks each stage's selected prompts by skill (or by
data_source for file data). A folder without its selections still plots, and says why."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from PIL import Image
from rich.console import Console

from cropi.curriculum import layout
from cropi.data.rewards import register_verifier
from cropi.data.sources import load_job_data
from cropi.embedded import run_job
from cropi.plot_inputs import stage_starts
from cropi.plotting import BOUNDARY_GID, CURVE_GIDS, SELECTION_GID, draw_run, plot_run
from cropi.runtime.store import LocalStore
from cropi.spec import load_spec, parse_spec

from .conftest import stand_in_verifier
from .jobs import tiny_job

STAGES, STEPS = 3, 2


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory, tiny_model):
    spec = parse_spec(tiny_job(
        name="plot-me",
        curriculum={"selector": "random", "stages": STAGES, "steps_per_stage": STEPS, "select_ratio": 0.25},
        eval={"every": 2, "samples": 2},
    ))
    run_dir = tmp_path_factory.mktemp("plotting") / "run"
    with register_verifier("int", stand_in_verifier):
        run_job(spec, run_dir, Console(quiet=True))
    return run_dir


def axes(fig, gid):
    return next(ax for ax in fig.axes if ax.get_gid() == gid)


def texts(ax):
    return [t.get_text() for t in ax.texts]


def stored_selections(run_dir):
    spec = load_spec(run_dir / "spec.yaml")
    return {s: json.loads((run_dir / "store" / layout.selection_key(spec.name, s)).read_text())
            for s in range(spec.curriculum.stages)}


def test_the_title_names_the_job_and_its_selector(plotted_run):
    title = draw_run(plotted_run)._suptitle.get_text()
    assert "plot-me" in title and "selector random" in title


@pytest.mark.parametrize("with_summary", [True, False], ids=["finished", "summary.json not yet written"])
def test_each_stage_start_is_a_labelled_line_at_the_step_the_stage_started(plotted_run, tmp_path, with_summary):
    summary = json.loads((plotted_run / "summary.json").read_text())
    # Stage k starts where stage k-1 ended (summary.json's end_step), stage 0 at step 0.
    expected = {0: 0, **{st["stage"] + 1: st["end_step"] for st in summary["stages"][:-1]}}
    assert expected == {k: k * STEPS for k in range(STAGES)}
    run_dir = plotted_run
    if not with_summary:  # as when the embedded run draws it, before writing its summary
        run_dir = tmp_path / "run"
        shutil.copytree(plotted_run, run_dir, ignore=shutil.ignore_patterns("summary.json", "redis"))
    fig = draw_run(run_dir)
    for gid in CURVE_GIDS:
        ax = axes(fig, gid)
        lines = {line.get_gid(): list(line.get_xdata()) for line in ax.lines if line.get_gid()}
        assert lines == {BOUNDARY_GID.format(k): [step, step] for k, step in expected.items()}, gid
        assert [t for t in texts(ax) if "stage" in t] == [f" stage {k}" for k in expected], gid


def test_a_stage_that_trained_nothing_starts_and_ends_where_the_next_one_starts():
    train = {0: [(1, 0.5), (2, 0.5)], 2: [(3, 0.5), (4, 0.5)]}
    assert stage_starts(train, {0, 1, 2}) == {0: 0, 1: 2, 2: 2}
    assert stage_starts(train, {0, 1, 2, 3}) == {0: 0, 1: 2, 2: 2, 3: 4}
    assert stage_starts({}, set()) == {}


def test_no_legend_lies_on_a_data_area(plotted_run):
    fig = draw_run(plotted_run)
    fig.canvas.draw()  # places the constrained layout
    renderer = fig.canvas.get_renderer()
    legends = [leg for ax in fig.axes if (leg := ax.get_legend())] + fig.legends
    labels = {t.get_text() for leg in legends for t in leg.get_texts()}
    assert {"add1", "mean reward per step"} <= labels  # the curves' legend is there
    assert {"add", "rev"} <= labels  # and the selection's, by skill
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (ax.get_gid(), [t.get_text() for t in leg.texts])


def test_the_selection_panel_stacks_each_stages_selected_prompts_by_skill(plotted_run):
    panel = axes(draw_run(plotted_run), SELECTION_GID)
    selections = stored_selections(plotted_run)
    skill = {p.id: p.meta["skill"] for p in load_job_data(load_spec(plotted_run / "spec.yaml")).pool}
    assert [t.get_text() for t in panel.get_xticklabels()] == [f"stage {s}" for s in selections]
    bars = {c.get_label(): [patch.get_height() for patch in c.patches] for c in panel.containers}
    assert all(len(heights) == STAGES for heights in bars.values())  # one bar group per stage
    for stage, record in selections.items():
        assert sum(heights[stage] for heights in bars.values()) == len(record["prompt_ids"]) > 0
        want = Counter(skill[i] for i in record["prompt_ids"])
        assert {k: h[stage] for k, h in bars.items() if h[stage]} == dict(want)
    assert any(f"{len(selections[0]['prompt_ids'])} of {selections[0]['eligible']} eligible" == t
               for t in texts(panel))


def test_plot_run_writes_a_png_of_the_figure(plotted_run, tmp_path):
    out = plot_run(plotted_run, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1500, 850)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # drawn, not blank
    assert (plotted_run / "curves.png").is_file()  # the run drew it too


@pytest.mark.parametrize("kept, why", [
    (("metrics.jsonl",), "no spec.yaml"),
    (("metrics.jsonl", "spec.yaml"), "no store/"),
    (("metrics.jsonl", "spec.yaml", "store/"), "no stored selections"),
], ids=["metrics only", "fetched without its store", "no selection stored"])
def test_a_folder_without_its_selections_plots_the_curves_and_says_why(plotted_run, tmp_path, kept, why):
    run_dir = tmp_path / "fetched"
    run_dir.mkdir()
    for name in kept:
        if name.endswith("/"):
            (run_dir / name).mkdir()
        else:
            shutil.copy(plotted_run / name, run_dir / name)
    fig = draw_run(run_dir)
    panel = axes(fig, SELECTION_GID)
    assert not panel.containers and any(why in t for t in texts(panel))
    reward = axes(fig, CURVE_GIDS[2])
    assert [list(line.get_xdata()) for line in reward.lines if not line.get_gid()] == [[1, 2], [3, 4], [5, 6]]
    assert ("plot-me" in fig._suptitle.get_text()) == ("spec.yaml" in kept)
    assert plot_run(run_dir).stat().st_size > 10_000


def test_file_data_is_counted_by_data_source(tmp_path):
    rows = [{"prompt": f"what is {i} + 1?", "answer": str(i + 1), "data_source": "gsm8k" if i % 3 else "math"}
            for i in range(12)]
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = parse_spec(tiny_job(name="from-files", data={
        "pool": {"source": str(data)},
        "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 4}]}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(spec.to_yaml())
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "stage": 0, "reward_mean": 0.5}))
    source = {p.id: p.meta["data_source"] for p in load_job_data(spec).pool}
    chosen = sorted(source)[:5]
    LocalStore(run_dir / "store").put(layout.selection_key(spec.name, 0), json.dumps(
        {"stage": 0, "prompt_ids": chosen, "scores": [], "eligible": 12}).encode())
    panel = axes(draw_run(run_dir), SELECTION_GID)
    assert "data_source" in panel.get_title()
    bars = {c.get_label(): [patch.get_height() for patch in c.patches] for c in panel.containers}
    assert bars == {k: [v] for k, v in Counter(source[i] for i in chosen).items()}

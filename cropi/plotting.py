"""`curves.png`: validation accuracy and training reward against step, with
the stage boundaries marked, and below them what each stage trained on.

    title      the job, its selector, stages x steps, pool source (spec.yaml)
    top row    greedy accuracy, sampled accuracy (when evaluated), training
               reward; each stage's start is a dotted line labelled
               "stage k" (odd stages shaded), so the reward change at a new
               stage reads as a new stage, not a collapse; the moving
               average restarts at each stage
    bottom     per stage, a stacked bar of its selected prompts by skill or
               data_source (the stored selections); where they are not
               available the panel says why
    legends    outside every data area (right of the top row's last panel
               and of the selection panel)

`draw_run` returns the Figure (tests read it); `plot_run` writes the PNG.
What is drawn is read by `plot_inputs.py`.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from cropi.plot_inputs import PlotInputs, read_plot_inputs

BOUNDARY_GID = "stage-start-{}"  # the gid of stage k's boundary line in each curve panel
SELECTION_GID = "selection-panel"
CURVE_GIDS = ("greedy-accuracy", "sampled-accuracy", "training-reward")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR's curves (see the module's docstring) into `out` (default RUN_DIR/curves.png)."""
    run_dir = Path(run_dir)
    fig = draw_run(run_dir)
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def draw_run(run_dir: str | Path) -> Figure:
    inputs = read_plot_inputs(Path(run_dir))
    sampled = any("sampled_accuracy" in p for pts in inputs.evals.values() for p in pts)
    # A Figure without pyplot: no global figure manager to leak into.
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(fig)  # fig.canvas: Agg, headless (servers, CI)
    fig.suptitle(inputs.title, fontsize=13)
    gids = CURVE_GIDS if sampled else (CURVE_GIDS[0], CURVE_GIDS[2])
    grid = fig.add_gridspec(2, len(gids), height_ratios=(3, 2))
    curves = {gid: fig.add_subplot(grid[0, i], gid=gid) for i, gid in enumerate(gids)}
    accuracy = [("accuracy", "greedy accuracy", curves[CURVE_GIDS[0]])]
    if sampled:
        accuracy.append(("sampled_accuracy", "sampled accuracy", curves[CURVE_GIDS[1]]))
    for metric, name, ax in accuracy:
        _accuracy(ax, inputs, metric, name)
    _reward(curves[CURVE_GIDS[2]], inputs)
    last = max([s for pts in inputs.train.values() for s, _ in pts] +
               [p["step"] for pts in inputs.evals.values() for p in pts] + [0])
    for ax in curves.values():
        _stage_marks(ax, inputs.stage_starts, last)
    handles: dict[str, object] = {}
    for ax in curves.values():
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:  # one legend for the row, right of its last panel: it covers no curve
        curves[gids[-1]].legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.02, 1),
                                fontsize=8, frameon=False)
    _selection(fig.add_subplot(grid[1, :], gid=SELECTION_GID), inputs)
    return fig


def _accuracy(ax: Axes, inputs: PlotInputs, metric: str, name: str) -> None:
    for i, (set_name, pts) in enumerate(sorted(inputs.evals.items())):
        pts = [p for p in pts if metric in p]
        if not pts:
            continue
        targeted = pts[0].get("targeted", True)
        ax.plot([p["step"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, color=f"C{i}",
                ls="-" if targeted else "--", label=f"{set_name}{'' if targeted else ' (untargeted)'}")
    ax.set(xlabel="training step", ylabel=name, title=f"validation: {name}", ylim=(-0.02, 1.12))
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    if not ax.lines:
        _say(ax, "no evaluation recorded yet")


def _reward(ax: Axes, inputs: PlotInputs) -> None:
    steps = sum(len(pts) for pts in inputs.train.values())
    window = max(1, steps // 20)
    for n, (stage, pts) in enumerate(sorted(inputs.train.items())):
        xs, ys = [s for s, _ in pts], [v for _, v in pts]
        # The moving average restarts at each stage: it never blends two stages' prompts.
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                  for i in range(len(ys))]
        if window == 1:  # nothing to smooth
            ax.plot(xs, ys, color="C0", marker="o", ms=3, label="_raw" if n else "mean reward per step")
            continue
        ax.plot(xs, ys, alpha=0.3, color="C0", label="_raw" if n else "mean reward per step")
        ax.plot(xs, smooth, color="C0", label="_smooth" if n else f"moving avg of {window} (restarts per stage)")
    ax.set(xlabel="training step", ylabel="mean reward", title="training batches")
    if steps:
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.15 * (high - low))  # headroom for the stage labels
    else:
        _say(ax, "no training step recorded yet")


def _stage_marks(ax: Axes, starts: dict[int, int], last: int) -> None:
    """A dotted line at each stage's start, labelled at the top; odd stages shaded up to the next start."""
    edges = sorted(starts.items())
    label_at = blended_transform_factory(ax.transData, ax.transAxes)
    for n, (stage, step) in enumerate(edges):
        end = edges[n + 1][1] if n + 1 < len(edges) else last
        if stage % 2 and end > step:
            ax.axvspan(step, end, color="0.5", alpha=0.08, lw=0, label="_stage band")
        ax.axvline(step, color="0.35", ls=":", lw=1.2, gid=BOUNDARY_GID.format(stage), label="_stage start")
        ax.text(step, 0.985, f" stage {stage}", transform=label_at, ha="left", va="top", fontsize=8, color="0.3")


def _selection(ax: Axes, inputs: PlotInputs) -> None:
    if not inputs.mixes:
        ax.set_axis_off()
        _say(ax, f"selection mix not shown: {inputs.mix_note}", size=11)
        return
    mixes = inputs.mixes
    values = sorted({v for m in mixes for v in m.counts}, key=lambda v: (-sum(m.counts.get(v, 0) for m in mixes), v))
    xs = list(range(len(mixes)))
    bottoms = [0] * len(mixes)
    for i, value in enumerate(values):
        heights = [m.counts.get(value, 0) for m in mixes]
        ax.bar(xs, heights, bottom=bottoms, width=0.6, color=f"C{i % 10}", label=value)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, m in zip(xs, mixes):
        of = f" of {m.eligible} eligible" if m.eligible is not None else ""
        ax.text(x, m.selected, f"{m.selected}{of}" if m.selected else f"none{of} (skipped)",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [f"stage {m.stage}" for m in mixes])
    ax.set_ylim(0, max(bottoms + [1]) * 1.15)
    ax.set(ylabel="selected prompts", title=f"what each stage trained on, by {inputs.mix_key or 'prompt'}")
    if values:
        ax.legend(title=inputs.mix_key or None, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8,
                  title_fontsize=8, frameon=False)


def _say(ax: Axes, text: str, size: int = 9) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=size, color="0.3", wrap=True)

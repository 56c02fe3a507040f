"""What `cropi bench acceleration` shows of its report: the figure and the summary tables."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def plot_acceleration(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("targeted", "step"), ("untargeted", "step"), ("targeted", "wall-clock (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, (which, x_label) in zip(axes, panels):
        for name, entry in report["selectors"].items():
            c = entry["curves"]
            ys = c.get(f"{which}_mean")
            if ys is None:
                continue
            xs = c["steps"] if x_label == "step" else c["wallclock_s_mean"]
            line, = ax.plot(xs, ys, marker=".", ms=3, label=name, lw=2.4 if name == "cropi" else 1.1,
                            ls="--" if name == "full" else "-")
            if which == "targeted" and x_label == "step":
                lo = [m - s for m, s in zip(ys, c["targeted_std"])]
                hi = [m + s for m, s in zip(ys, c["targeted_std"])]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.10)
        if which == "targeted" and x_label == "step":
            for label, y in report["levels"].items():
                ax.axhline(y, color="gray", ls=":", lw=0.8)
                ax.annotate(f"{label} of full's gain", (0, y), fontsize=7, color="gray", va="bottom")
            ax.axvline(report["budget_steps"], color="black", lw=0.6, alpha=0.5)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{which} {report['metric']}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"acceleration benchmark ({report['seeds']} paired seeds; selectors {report['budget_steps']} steps, "
                 f"full {report['schedule']['full_steps']}; band: ±1 std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "never" if value is None else f"{value:{spec}}{suffix}"


def _fmt_ci(ci: list[float] | None, suffix: str = "x") -> str:
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]{suffix}"


def print_summary(report: dict, console: Console) -> None:
    levels = ", ".join(f"{k} {v:.3f}" for k, v in report["levels"].items())
    table = Table(title=f"targeted {report['metric']}: base {report['base']:.3f}, full final "
                        f"{report['full_final']:.3f} at {report['schedule']['full_steps']} steps; levels {levels}")
    for col in ("selector", "final", "paper accel. [90%]", "75% accel. [90%]", "90% accel. [90%]",
                "area ratio [90%]", "wall 75%", "selection/train"):
        table.add_column(col, justify="left" if col == "selector" else "right")
    for name, e in report["selectors"].items():
        n75, n90 = e["neutral"]["75%"], e["neutral"]["90%"]
        share = e.get("selection_share_of_training")
        table.add_row(
            name, f"{e['final_targeted']['mean']:.3f} ± {e['final_targeted']['std']:.3f}",
            f"{_fmt(e['paper']['acceleration'], '.2f', 'x')} {_fmt_ci(e['paper']['interval90'])}",
            f"{_fmt(n75['acceleration'], '.2f', 'x')} {_fmt_ci(n75['interval90'])}",
            f"{_fmt(n90['acceleration'], '.2f', 'x')} {_fmt_ci(n90['interval90'])}",
            f"{_fmt(e['area_ratio'])} {_fmt_ci(e['area_ratio_interval90'], '')}",
            _fmt(n75["wallclock_acceleration"], ".2f", "x"),
            "-" if share is None else f"{share:.0%}",
        )
    console.print(table)
    if "cropi_minus" in report:
        diffs = Table(title="cropi minus baseline: gain area (mean targeted gain over the budget), paired 90 % interval")
        for col in ("baseline", "difference", "90% interval", "verdict"):
            diffs.add_column(col)
        for name, d in report["cropi_minus"].items():
            diffs.add_row(name, f"{d['gain_area_difference']:+.4f}", _fmt_ci(d["interval90"], ""), d["verdict"])
        console.print(diffs)

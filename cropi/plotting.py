"""`curves.png`: validation accuracy and training reward against step."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from cropi.errors import InputError  # noqa: E402
from cropi.tracking import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise InputError(f"{run_dir} is not a cropi run folder (no metrics.jsonl)")
    records = read_metrics(run_dir)
    evals: dict[str, list[dict]] = defaultdict(list)
    train: list[tuple[int, float]] = []
    for r in records:
        if r["kind"] == "eval":
            evals[r["set"]].append(r)
        elif r["kind"] == "train":
            train.append((r["step"], r["reward_mean"]))
    fig, (ax_acc, ax_smp, ax_rew) = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in ((ax_acc, "accuracy", "greedy accuracy"), (ax_smp, "sampled_accuracy", "sampled accuracy")):
        for i, (name, pts) in enumerate(sorted(evals.items())):
            pts = sorted((p for p in pts if metric in p), key=lambda p: p["step"])
            if not pts:
                continue
            targeted = pts[0].get("targeted", True)
            ax.plot([p["step"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, color=f"C{i}",
                    ls="-" if targeted else "--", label=f"{name}{'' if targeted else ' (untargeted)'}")
        ax.set(xlabel="training step", ylabel=title, title=f"validation: {title}", ylim=(0, 1))
        if ax.lines:
            ax.legend(fontsize=8)
    if train:
        train.sort()
        window = max(1, len(train) // 20)
        xs = [s for s, _ in train]
        ys = [v for _, v in train]
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
        ax_rew.plot(xs, ys, alpha=0.3, color="C0")
        ax_rew.plot(xs, smooth, color="C0", label=f"mean reward (moving avg {window})")
        ax_rew.legend(fontsize=8)
    ax_rew.set(xlabel="training step", ylabel="reward", title="training batches")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

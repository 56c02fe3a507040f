"""Gain-area difference of one selector between two acceleration benches run on the same seeds,
with its paired-bootstrap 90 % interval (the seeds of both benches resampled together).

    .venv/bin/python docs/bench/paired_difference.py RECORDS_A RECORDS_B [SELECTOR] [BUDGET]

RECORDS_* are `OUT/records` folders of `cropi bench acceleration` (seed-N/<selector>.json);
both must hold `full` for the same seeds, which fixes the base accuracy. B minus A is printed.
How the default of `influence.logprob_temperature` was chosen (docs/performance.md).
"""
import json
import sys
from pathlib import Path

from cropi.bench.acceleration import BOOTSTRAP_RESAMPLES, _curve
from cropi.bench.acceleration_math import gain_area, paired_bootstrap

a_dir, b_dir = Path(sys.argv[1]), Path(sys.argv[2])
selector = sys.argv[3] if len(sys.argv) > 3 else "cropi"
budget = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
seeds = sorted(int(p.name.split("-")[1]) for p in a_dir.glob("seed-*"))


def records(folder: Path, name: str) -> list[dict]:
    return [json.loads((folder / f"seed-{s}" / f"{name}.json").read_text())["record"] for s in seeds]


full_a, full_b = records(a_dir, "full"), records(b_dir, "full")
if [r["targeted"] for r in full_a] != [r["targeted"] for r in full_b]:
    sys.exit("the two benches' `full` runs differ: they are not paired")
runs_a, runs_b = records(a_dir, selector), records(b_dir, selector)


def area(runs: list[dict], idx: list[int] | None) -> float:
    return gain_area(_curve(runs, "targeted", idx), _curve(full_a, "targeted", idx)[0][1], budget)


diff = area(runs_b, None) - area(runs_a, None)
lo, hi = paired_bootstrap(len(seeds), lambda idx: area(runs_b, idx) - area(runs_a, idx), BOOTSTRAP_RESAMPLES, seed=0)
verdict = "tie" if lo <= 0 <= hi else ("B ahead" if lo > 0 else "B behind")
print(f"{selector} gain area over {budget:g} steps, {len(seeds)} seeds: A {area(runs_a, None):.4f}, "
      f"B {area(runs_b, None):.4f}, B - A {diff:+.4f} [90 % {lo:+.4f}, {hi:+.4f}]: {verdict}")

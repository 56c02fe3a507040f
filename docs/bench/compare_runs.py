"""Bit-for-bit comparison of two `cropi run` folders of the same job, timing fields aside:
every stage's selection, every metric record, the summary, the final checkpoint's weights
and every projected-gradient part.

    .venv/bin/python docs/bench/compare_runs.py RUN_A RUN_B     (exit 0: identical)

How the layering redesign (issue G) was shown to change nothing.
"""
import hashlib, json, sys
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
TIMING = {"rollout_s", "train_s", "sync_s", "seconds", "wallclock_s", "time"}
def strip(x):
    if isinstance(x, dict): return {k: strip(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list): return [strip(v) for v in x]
    return x
def jsonl(p): return [strip(json.loads(l)) for l in p.read_text().splitlines() if l.strip()]
ok = True
sels = sorted(p.relative_to(a) for p in (a / "store").rglob("selection.json"))
for rel in sels:
    same = strip(json.loads((a / rel).read_text())) == strip(json.loads((b / rel).read_text()))
    ok &= same; print(f"{'same' if same else 'DIFF'} {rel}")
same = jsonl(a / "metrics.jsonl") == jsonl(b / "metrics.jsonl"); ok &= same
print(f"{'same' if same else 'DIFF'} metrics.jsonl ({len(jsonl(a / 'metrics.jsonl'))} records)")
sa, sb = strip(json.loads((a / "summary.json").read_text())), strip(json.loads((b / "summary.json").read_text()))
sa.pop("run_dir"); sb.pop("run_dir"); same = sa == sb; ok &= same; print(f"{'same' if same else 'DIFF'} summary.json")
for f in sorted((a / "checkpoint").glob("*.safetensors")):
    same = hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256((b / "checkpoint" / f.name).read_bytes()).digest()
    ok &= same; print(f"{'same' if same else 'DIFF'} checkpoint/{f.name} (sha256)")
grads = sorted(p.relative_to(a) for p in (a / "store").rglob("*.npy"))
diff = [r for r in grads if (a / r).read_bytes() != (b / r).read_bytes()]
ok &= not diff; print(f"{'same' if not diff else 'DIFF'} {len(grads)} projected-gradient parts" + (f" ({len(diff)} differ)" if diff else ""))
print("BIT-FOR-BIT" if ok else "DIFFERENT"); sys.exit(0 if ok else 1)

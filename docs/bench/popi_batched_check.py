"""Issue F2 probe: batched POPI (POPIProjector(batch_tokens=...)) against the per-prompt loop on
62 eligible tiny-model groups x 8 responses, 1 thread: equality, speed, run-to-run identity.

    .venv/bin/python docs/bench/popi_batched_check.py
"""
import time, torch, numpy as np
from cropi.models.loading import load_policy
from cropi.influence.offline import collect_offline, load_offline
from cropi.influence.popi import POPIProjector
from cropi.influence.projection import SparseProjector
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore
from cropi.data import arith
from cropi.data.rewards import register_verifier
import tempfile
import sys; torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
model, tok = load_policy("builtin:tiny-arith?sft_steps=30&sft_batch=64")
store = LocalStore(tempfile.mkdtemp())
prompts = arith.generate(64, seed="bt", skills=("add","mul","rev"), digits=(1,2))
with register_verifier("int", lambda r, ref: float(sum(map(ord, r)) % 3 == 0)):
    collect_offline(HFRolloutEngine(model, tok), store, lambda i: f"p/part-{i:05d}.parquet", "pool", prompts, n=8, temperature=1.0, max_new_tokens=6, seed=0, part_size=64)
groups = load_offline(store, "p/")
print("eligible", sum(g.eligible for g in groups), "of", len(groups))
proj = SparseProjector(8192, 1.0, 0)
for bt in (None, 2048, 8192, 32768):
    p = POPIProjector(model, proj, tok.pad_token_id, batch_tokens=bt)
    p.project_groups(groups[:4])
    t0 = time.perf_counter(); out = p.project_groups(groups); dt = time.perf_counter() - t0
    p.close()
    if bt is None: ref = out; base = dt
    rel = np.max(np.linalg.norm(out.vectors - ref.vectors, axis=1) / np.maximum(np.linalg.norm(ref.vectors, axis=1), 1e-30))
    print(f"batch_tokens={bt}: {dt:.2f}s  speedup {base/dt:.2f}x  max rel err {rel:.2e}  eligible same {np.array_equal(out.eligible, ref.eligible)}")
p = POPIProjector(model, proj, tok.pad_token_id, batch_tokens=8192); a = p.project_groups(groups); b = p.project_groups(groups); p.close()
print("bit-identical run to run:", np.array_equal(a.vectors, b.vectors))

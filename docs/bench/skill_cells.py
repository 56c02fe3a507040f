"""Per (skill, digits) cell of builtin:arith, for one model: greedy accuracy, the share
of greedy answers that are the skill's confused strategy, sampled accuracy at T = 1,
the confused share among samples, and pass@8 (100 prompts per cell).

    .venv/bin/python docs/bench/skill_cells.py "builtin:tiny-arith" [threads]

How the testbed's targets were chosen (docs/performance.md, "The testbed").
"""
import sys, torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
from cropi.models.loading import load_policy
from cropi.rollout.hf import HFRolloutEngine
from cropi.rollout.base import SamplingParams
from cropi.data import arith
from cropi.data.rewards import reward
model, tok = load_policy(sys.argv[1]); model.eval()
eng = HFRolloutEngine(model, tok, 512)
print("cell    greedy  g_conf  sampled s_conf pass@8")
for skill in arith.SKILLS:
    for d in (1, 2, 3, 4):
        ps = arith.generate(100, seed="probe", skills=(skill,), digits=(d,))
        texts = [p.text for p in ps]
        g = eng.generate(texts, 1, SamplingParams(greedy=True, max_new_tokens=8))
        s = eng.generate(texts, 8, SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))
        ga = sum(reward(p, x[0].text) for p, x in zip(ps, g)) / len(ps)
        gc = sum(x[0].text.strip() == p.meta["confused_answer"] for p, x in zip(ps, g)) / len(ps)
        sa = sum(reward(p, t.text) for p, x in zip(ps, s) for t in x) / (8 * len(ps))
        sc = sum(t.text.strip() == p.meta["confused_answer"] for p, x in zip(ps, s) for t in x) / (8 * len(ps))
        pk = sum(any(reward(p, t.text) for t in x) for p, x in zip(ps, s)) / len(ps)
        print(f"{skill}{d:<5}  {ga:.2f}    {gc:.2f}    {sa:.2f}    {sc:.2f}   {pk:.2f}", flush=True)

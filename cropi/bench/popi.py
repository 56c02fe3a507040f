"""`cropi bench popi`: the cost of a projected POPI gradient vs a plain backward.

Both sides run the same forward + backward of one prompt's group (G
responses) on the same randomly initialised model; POPI adds the importance
ratio, the projection hooks and the per-parameter accumulators, and frees
each parameter's gradient once projected. Each side runs in its own
subprocess so that peak memory (max RSS above the RSS measured before the
first backward) is not polluted by the other.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _worker(mode: str, hidden: int, layers: int, group: int, prompt_len: int, response_len: int,
            proj_dim: int, sparse_ratio: float, repeats: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cropi.influence.offline import OfflineGroup
    from cropi.influence.popi import POPIProjector, group_batch
    from cropi.influence.projection import SparseProjector
    from cropi.rl.batch import response_logits, token_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                         max_position_embeddings=prompt_len + response_len + 8, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 512, (prompt_len,), generator=gen).tolist()
    responses = torch.randint(1, 512, (group, response_len), generator=gen).tolist()
    rewards = [float(i % 2) for i in range(group)]
    g = OfflineGroup("bench", prompt, responses, [[-1.0] * response_len] * group, rewards, 1.0)
    n_params = sum(p.numel() for p in model.parameters())

    if mode == "popi":
        popi = POPIProjector(model, SparseProjector(proj_dim, sparse_ratio, seed=0), pad_id=0)

        def step() -> None:
            popi.project_group(g)
    else:

        def step() -> None:
            model.zero_grad(set_to_none=True)
            batch = group_batch(g, 0)
            logp = token_logprobs(response_logits(model, batch), batch.response_ids)
            loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
            loss.backward()

    rss_before = _rss_kib()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    return {"mode": mode, "params": n_params, "seconds": min(times[1:]), "peak_extra_mib": peak_kib / 1024}


def run_popi_bench(hidden: int = 512, layers: int = 8, group: int = 8, prompt_len: int = 64,
                   response_len: int = 256, proj_dim: int = 8192, sparse_ratio: float = 0.1,
                   repeats: int = 3) -> dict:
    args = dict(hidden=hidden, layers=layers, group=group, prompt_len=prompt_len, response_len=response_len,
                proj_dim=proj_dim, sparse_ratio=sparse_ratio, repeats=repeats)
    results = {}
    for mode in ("plain", "popi"):
        code = f"import json; from cropi.bench.popi import _worker; print(json.dumps(_worker({mode!r}, **{args!r})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, popi = results["plain"], results["popi"]
    return {
        **args,
        "params": plain["params"],
        "plain_backward_s": plain["seconds"],
        "popi_projected_s": popi["seconds"],
        "plain_peak_extra_mib": plain["peak_extra_mib"],
        "popi_peak_extra_mib": popi["peak_extra_mib"],
        "time_ratio": popi["seconds"] / plain["seconds"],
        "peak_memory_ratio": popi["peak_extra_mib"] / max(plain["peak_extra_mib"], 1e-9),
    }

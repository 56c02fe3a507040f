"""Cost model of CROPI's influence stage against GRPO training (docs/performance.md, "Cost model at 1.5B–7B").

    python docs/bench/cost_model.py            # the tables of the doc (markdown)
    python docs/bench/cost_model.py --mfu 0.3 --gen-tput-7b 6000 ...   # other assumptions

Pure arithmetic, standard library only: every number of the doc comes from here,
every formula is in a function below with the doc's notation:

    h hidden, I intermediate, n_l layers, n_h heads, n_kv KV heads, d = h / n_h, V vocab
    G responses per prompt, P prompt tokens, R response tokens (the doc's L)
    N_layer  = 2h^2 + 2h(n_kv d) + 3hI      (q, o; k, v; gate, up, down: weight matrices)
    N_body   = n_l N_layer                  N_head = V h (the output projection, tied or not)
    N_mm     = N_body + N_head              (matmul weights a token passes through)
    N_params = N_body + biases + norms + V h (embedding) + (V h if untied)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def n_layer(self) -> int:
        """Weight-matrix parameters of one decoder layer."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.inter

    @property
    def n_layer_all(self) -> int:
        """All parameters of one layer: + q/k/v biases + 2 RMSNorm weights."""
        return self.n_layer + self.hidden + 2 * self.kv_dim + 2 * self.hidden

    @property
    def n_body(self) -> int:
        return self.layers * self.n_layer

    @property
    def n_head(self) -> int:
        return self.vocab * self.hidden

    @property
    def n_mm(self) -> int:
        return self.n_body + self.n_head

    @property
    def n_params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.n_layer_all + self.hidden + embed + (0 if self.tied else self.n_head)

    def n_subset(self, last: int) -> int:
        """Parameters of the `last` layers + final norm + output head (`influence.params: [last:L]`)."""
        return last * self.n_layer_all + self.hidden + self.n_head


QWEN_15B = Model("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, tied=True)
QWEN_7B = Model("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, tied=False)
MODELS = (QWEN_15B, QWEN_7B)


# ---------------------------------------------------------------------------
# FLOPs of one scored prompt (POPI forward + backward of its G responses)


def pairs_full(G: int, P: int, R: int) -> int:
    """Causal (query, key) pairs of G full sequences of P + R tokens: G * S(S+1)/2."""
    S = P + R
    return G * S * (S + 1) // 2


def pairs_shared(G: int, P: int, R: int) -> int:
    """Prompt once (P(P+1)/2), then each response's R queries over P + r keys."""
    return P * (P + 1) // 2 + G * (R * P + R * (R + 1) // 2)


def attn_flops(m: Model, pairs: int, layers: int | None = None, backward_layers: int | None = None) -> float:
    """4h FLOPs per pair per layer forward (QK^T and AV, 2h each), 8h backward (4 matmuls).
    Flash attention's recompute of QK^T in backward (+2h) is left out."""
    fwd_layers = m.layers if layers is None else layers
    bwd_layers = m.layers if backward_layers is None else backward_layers
    return (4 * fwd_layers + 8 * bwd_layers) * m.hidden * pairs


def popi_flops(m: Model, G: int, P: int, R: int, shared: bool = True, last: int | None = None) -> dict[str, float]:
    """FLOPs of one prompt's POPI gradient.

    Dense: 2 N FLOPs per token forward, 4 N backward (2 for input gradients, 2 for weight
    gradients). Full sequences (`shared=False`, what a plain per-sequence pass does): every
    one of the G (P + R) tokens passes the body and the head (the head's logits at prompt
    positions are computed and get zero gradients). Shared prompt (cropi's grouped path):
    the body sees P + G R tokens, the head G R (the prompt pass keeps its last logit only).
    `last`: gradients of the last `last` layers + head only: forward unchanged, backward
    through those layers and the head only (the lowest layer's input gradient is counted,
    a small over-estimate)."""
    body_tokens = G * (P + R) if not shared else P + G * R
    head_tokens = G * (P + R) if not shared else G * R
    pairs = pairs_full(G, P, R) if not shared else pairs_shared(G, P, R)
    fwd = 2 * (m.n_body * body_tokens + m.n_head * head_tokens)
    bwd_body = m.n_body if last is None else last * m.n_layer
    bwd = 4 * (bwd_body * body_tokens + m.n_head * head_tokens)
    attn = attn_flops(m, pairs, backward_layers=None if last is None else last)
    return {"body_tokens": body_tokens, "head_tokens": head_tokens, "dense": fwd + bwd, "attn": attn,
            "total": fwd + bwd + attn}


# ---------------------------------------------------------------------------
# Bytes of the projection, per scored prompt


def logit_bytes(m: Model, scored_tokens: int, passes: float) -> float:
    """fp32 logits of the scored (response) positions, V x 4 bytes each, read or written `passes`
    times (cast, / temperature, log-softmax forward and backward, gather; + entropy in training)."""
    return passes * scored_tokens * m.vocab * 4


def projection_bytes(n_grad: int, grad_bytes: int) -> dict[str, float]:
    """Backward writes the gradient once (n_grad x grad_bytes), the sketch reads it once."""
    return {"write": n_grad * grad_bytes, "read": n_grad * grad_bytes, "total": 2 * n_grad * grad_bytes}


# ---------------------------------------------------------------------------
# Hardware and workload assumptions (all overridable on the command line)


@dataclass
class Assumptions:
    peak_tflops: float = 989.0  # H100/H200 SXM bf16 dense
    mfu: float = 0.40  # achieved fraction of peak, POPI fwd+bwd and training
    hbm_tbs: float = 3.35  # H100 SXM HBM3 (H200: 4.8)
    hbm_tbs_h200: float = 4.8
    bw_eff: float = 0.80  # achievable fraction of HBM bandwidth for a streaming read
    logit_passes_popi: float = 6.0  # fp32 [tokens, V] passes per POPI pass (see logit_bytes)
    logit_passes_train: float = 10.0  # policy (+ entropy) and reference
    pcie_gbs: float = 25.0  # achieved host<->device, PCIe Gen4 x16
    host_cpu_s_7b: float = 2.9  # the CPU sketch time per 7B prompt on the old host path
    paper_s_per_prompt_15b: float = 1.5  # authors' code, 1.5B
    G: int = 8
    P: int = 128
    pool: int = 50_000
    eligible: float = 1.0  # share of the pool with mixed rewards (only those are scored)
    valid_sets: int = 2
    valid_prompts: int = 100
    n_valid: int = 32  # responses per validation prompt
    batch_prompts: int = 64  # GRPO step: 64 prompts x 8 rollouts
    gen_tput_15b: float = 30_000.0  # vLLM output tokens/s per GPU at a large batch
    gen_tput_7b: float = 10_000.0
    decode_overhead_ms: float = 1.0  # per decode step, on top of reading the weights once
    net_gbs_intra: float = 300.0  # per-GPU collective bandwidth inside one NVLink node (N <= 8)
    net_gbs_inter: float = 50.0  # per GPU across nodes (400 Gb/s InfiniBand)

    def flops_per_s(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu

    def gen_tput(self, m: Model) -> float:
        return self.gen_tput_15b if m is QWEN_15B else self.gen_tput_7b


def popi_seconds(m: Model, R: int, a: Assumptions, last: int | None = None, shared: bool = True,
                 grad_bytes: int = 2, hbm_tbs: float | None = None) -> dict[str, float]:
    """t_prompt = FLOPs / (MFU x peak) + (logit bytes + projection bytes) / (bw_eff x HBM)."""
    f = popi_flops(m, a.G, a.P, R, shared, last)
    n_grad = m.n_params if last is None else m.n_subset(last)
    b = projection_bytes(n_grad, grad_bytes)
    bw = a.bw_eff * (hbm_tbs or a.hbm_tbs) * 1e12
    compute = f["total"] / a.flops_per_s()
    logits = logit_bytes(m, a.G * R, a.logit_passes_popi) / bw
    proj = b["total"] / bw
    return {"flops": f["total"], "compute_s": compute, "logits_s": logits, "proj_bytes": b["total"],
            "proj_s": proj, "sketch_read_s": b["read"] / bw, "total_s": compute + logits + proj}


def valid_equivalents(a: Assumptions, R: int) -> float:
    """Validation prompts (targets) in pool-prompt units: token ratio (P + n_valid R) / (P + G R)."""
    return a.valid_sets * a.valid_prompts * (a.P + a.n_valid * R) / (a.P + a.G * R)


def influence_stage(m: Model, R: int, n_gpus: int, a: Assumptions, last: int | None = None,
                    pool: int | None = None) -> dict[str, float]:
    """GPU-hours of one stage's influence = (pool x eligible + validation) x t_prompt; wall = / N."""
    t = popi_seconds(m, R, a, last)["total_s"]
    prompts = (a.pool if pool is None else pool) * a.eligible + valid_equivalents(a, R)
    gpu_s = prompts * t
    return {"t_prompt": t, "prompts": prompts, "gpu_h": gpu_s / 3600, "wall_s": gpu_s / n_gpus}


def grpo_step(m: Model, R: int, n_gpus: int, a: Assumptions) -> dict[str, float]:
    """One synchronous GRPO step on N GPUs (rollout and training colocated, one after the other).

    generation: max(B G R / (N tput), R t_tok), t_tok = 2 N_params / (bw_eff HBM) + overhead
                (a decode step reads the weights once: the latency floor when few sequences per GPU)
    training:   max(compute, ZeRO-3 traffic), T = B G (P + R); compute = (8 N_mm T + attention) /
                (N MFU peak) + fp32 logit traffic / (N bw_eff HBM): policy forward + backward (6 N)
                + reference forward (2 N) per token, attention 16 h n_l per pair; ZeRO-3 moves
                3 x 2 N_params bytes per GPU per step (all-gather forward, all-gather backward,
                reduce-scatter gradients), (N-1)/N of it over the network, overlapped with compute
    weight sync: 2 N_params / net bandwidth (trainer -> rollout broadcast)
    """
    B, G, P = a.batch_prompts, a.G, a.P
    tokens_gen = B * G * R
    t_tok = 2 * m.n_params / (a.bw_eff * a.hbm_tbs * 1e12) + a.decode_overhead_ms / 1e3
    gen = max(tokens_gen / (n_gpus * a.gen_tput(m)), R * t_tok)
    T = B * G * (P + R)
    attn = (12 + 4) * m.layers * m.hidden * pairs_full(B * G, P, R)  # policy fwd + bwd, reference fwd
    flops = 8 * m.n_mm * T + attn
    logits = logit_bytes(m, B * G * R, a.logit_passes_train)
    compute = flops / (n_gpus * a.flops_per_s()) + logits / (n_gpus * a.bw_eff * a.hbm_tbs * 1e12)
    net = a.net_gbs_intra if n_gpus <= 8 else a.net_gbs_inter
    comm = 3 * 2 * m.n_params * (n_gpus - 1) / n_gpus / (net * 1e9)
    train = max(compute, comm)
    sync = 2 * m.n_params / (net * 1e9)
    return {"gen_s": gen, "train_s": train, "compute_s": compute, "comm_s": comm, "sync_s": sync,
            "step_s": gen + train + sync, "t_tok": t_tok}


def offline_rollouts(m: Model, R: int, n_gpus: int, a: Assumptions) -> dict[str, float]:
    """Once per job: pool x G responses + validation x n_valid, at the large-batch throughput."""
    tokens = (a.pool * a.G + a.valid_sets * a.valid_prompts * a.n_valid) * R
    gpu_s = tokens / a.gen_tput(m)
    return {"gpu_h": gpu_s / 3600, "wall_s": gpu_s / n_gpus}


def break_even(m: Model, R: int, n_gpus: int, steps: int, a: Assumptions, last: int | None = None,
               accel: float = 2.66) -> dict[str, float]:
    """Influence pays when (a - 1) S t_step > T_inf (a: full-data steps per CROPI step).

    a_min = 1 + T_inf / (S t_step);  pool_max(a) = ((a - 1) S t_step N / t_prompt - valid) / eligible.
    """
    inf = influence_stage(m, R, n_gpus, a, last)
    step = grpo_step(m, R, n_gpus, a)["step_s"]
    train = steps * step
    a_min = 1 + inf["wall_s"] / train
    budget_gpu_s = (accel - 1) * train * n_gpus
    pool_max = (budget_gpu_s / inf["t_prompt"] - valid_equivalents(a, R)) / a.eligible
    return {"a_min": a_min, "pool_max": max(0.0, pool_max), "train_s": train, "inf_wall_s": inf["wall_s"],
            "step_s": step, "gpu_h": inf["gpu_h"]}


# ---------------------------------------------------------------------------
# Tables


def _e(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}".replace("e+", "e")


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def tables(a: Assumptions, lengths=(512, 1024), gpus=(8, 64), steps=(40, 100), last: int = 4) -> str:
    out = []
    out.append("### Models\n")
    out.append(table(["model", "N_params", "N_layer (weights)", "N_body", "N_head = V h", "N_mm",
                      f"last {last} + head", "bf16 gradient"],
                     [[m.name, f"{m.n_params / 1e9:.3f} B", f"{m.n_layer / 1e6:.1f} M", f"{m.n_body / 1e9:.3f} B",
                       f"{m.n_head / 1e6:.0f} M", f"{m.n_mm / 1e9:.3f} B", f"{m.n_subset(last) / 1e9:.3f} B",
                       f"{2 * m.n_params / 1e9:.2f} GB"] for m in MODELS]))

    out.append(f"\n### One scored prompt (G = {a.G}, P = {a.P}; H100 at MFU {a.mfu:.0%} of {a.peak_tflops:.0f} "
               f"TFLOPS, HBM {a.hbm_tbs} TB/s x {a.bw_eff:.0%})\n")
    rows = []
    for m in MODELS:
        for R in lengths:
            full = popi_flops(m, a.G, a.P, R, shared=False)
            sh = popi_flops(m, a.G, a.P, R, shared=True)
            sub = popi_flops(m, a.G, a.P, R, shared=True, last=last)
            t = popi_seconds(m, R, a)
            t_sub = popi_seconds(m, R, a, last=last)
            t200 = popi_seconds(m, R, a, hbm_tbs=a.hbm_tbs_h200)
            t32 = popi_seconds(m, R, a, grad_bytes=4)
            rows.append([
                m.name, str(R), f"{full['body_tokens']} / {sh['body_tokens']}",
                f"{full['total'] / 1e12:.1f}", f"{sh['total'] / 1e12:.1f} ({1 - sh['total'] / full['total']:.1%} less)",
                f"{sh['attn'] / sh['total']:.1%}", f"{sub['total'] / 1e12:.1f}",
                f"{t['proj_bytes'] / 1e9:.1f}", f"{t['proj_s'] * 1e3:.1f} / {t200['proj_s'] * 1e3:.1f}",
                f"{t32['proj_s'] * 1e3:.1f}", f"{t['logits_s'] * 1e3:.1f}",
                f"{t['total_s'] * 1e3:.0f}", f"{t_sub['total_s'] * 1e3:.0f}",
            ])
    out.append(table(["model", "L", "body tokens full / shared", "TFLOP full seq.", "TFLOP shared prompt",
                      "attention share", f"TFLOP last {last} + head", "proj. bytes GB (write + read, bf16)",
                      "proj. ms H100 / H200", "proj. ms fp32 grads (grouped path), H100", "logit ms H100",
                      "ms / prompt", f"ms / prompt, last {last}"], rows))

    out.append(f"\n### Per stage: pool {a.pool:,} (eligible {a.eligible:.0%}) + {a.valid_sets} x {a.valid_prompts} "
               f"validation prompts x {a.n_valid} responses; GRPO step {a.batch_prompts} x {a.G} x L\n")
    rows = []
    for m in MODELS:
        for R in lengths:
            for n in gpus:
                step = grpo_step(m, R, n, a)
                for sub in (None, last):
                    inf = influence_stage(m, R, n, a, sub)
                    cells = [m.name, str(R), str(n), "all" if sub is None else f"last {sub}",
                             f"{inf['gpu_h']:.2f}", f"{inf['wall_s'] / 60:.1f}",
                             f"{step['step_s']:.1f} ({step['gen_s']:.1f} + {step['train_s']:.1f} + {step['sync_s']:.1f})"]
                    for S in steps:
                        be = break_even(m, R, n, S, a, sub)
                        cells.append(f"{be['a_min']:.2f}x")
                    be = break_even(m, R, n, steps[0], a, sub)
                    cells.append(f"{be['pool_max'] / 1e3:.1f}k")
                    be15 = break_even(m, R, n, steps[0], a, sub, accel=1.5)
                    cells.append(f"{be15['pool_max'] / 1e3:.1f}k")
                    rows.append(cells)
    out.append(table(["model", "L", "N GPUs", "grads of", "influence GPU-h / stage", "wall min / stage",
                      "GRPO step s (gen + train + sync)", *[f"a_min, S = {S}" for S in steps],
                      f"pool_max at 2.66x, S = {steps[0]}", f"pool_max at 1.5x, S = {steps[0]}"], rows))

    out.append("\n### Offline rollouts (once per job, not per stage)\n")
    rows = []
    for m in MODELS:
        for R in lengths:
            o = offline_rollouts(m, R, gpus[0], a)
            rows.append([m.name, str(R), f"{o['gpu_h']:.2f}", f"{o['wall_s'] / 60:.1f}"])
    out.append(table(["model", "L", "GPU-h", f"wall min on {gpus[0]} GPUs"], rows))

    out.append("\n### Against the reported costs\n")
    rows = []
    paper_gpu_h = a.pool * a.paper_s_per_prompt_15b / 3600
    for R in lengths:
        t = popi_seconds(QWEN_15B, R, a)["total_s"]
        rows.append([f"1.5B, L = {R}: authors' code (paper) vs this model",
                     f"{a.paper_s_per_prompt_15b:.2f} s/prompt, {paper_gpu_h:.1f} GPU-h / 50k",
                     f"{t:.3f} s/prompt, {a.pool * t / 3600:.2f} GPU-h / 50k", f"{a.paper_s_per_prompt_15b / t:.0f}x"])
    g7 = 2 * QWEN_7B.n_params
    for R in lengths:
        t = popi_seconds(QWEN_7B, R, a)
        host = t["compute_s"] + g7 / (a.pcie_gbs * 1e9) + a.host_cpu_s_7b
        rows.append([f"7B, L = {R}: old host path vs GPU sketch",
                     f"{host:.2f} s/prompt ({g7 / 1e9:.1f} GB over PCIe {g7 / (a.pcie_gbs * 1e9):.2f} s + CPU "
                     f"{a.host_cpu_s_7b} s + compute {t['compute_s']:.2f} s), {a.pool * host / 3600:.1f} GPU-h / 50k",
                     f"{t['total_s']:.3f} s/prompt (sketch read {t['sketch_read_s'] * 1e3:.1f} ms H100, "
                     f"{popi_seconds(QWEN_7B, R, a, hbm_tbs=a.hbm_tbs_h200)['sketch_read_s'] * 1e3:.1f} ms H200), "
                     f"{a.pool * t['total_s'] / 3600:.1f} GPU-h / 50k", f"{host / t['total_s']:.1f}x"])
    out.append(table(["case", "reported / old", "this model", "ratio"], rows))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    a = Assumptions()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, value in vars(a).items():
        ap.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = ap.parse_args(argv)
    a = Assumptions(**vars(args))
    print(tables(a))


if __name__ == "__main__":
    main()

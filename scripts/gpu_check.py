#!/usr/bin/env python
"""One prepared GPU check of cropi's device paths (docs/design.md §10), for a
session that has one H100/H200 for a few minutes. CI never runs it.

Prints ONE markdown table, one row per check (sub-rows a2, a3 ...):

  a   projection kernel: `SparseProjector(32768, 1.0).new_accumulator().add("w", g)`
      + `.result()` on a 1.5e9-coordinate bf16 CUDA gradient (halved until it
      fits), GB/s against `dst.copy_(src)` of the same tensor; goal ratio >= 0.5.
      a2: `sketch_triton.sketch_into` called directly (the kernel without the
      Accumulator's wiring); a3: the 290 parameter-shaped gradients of Qwen2.5-0.5B
      through one Accumulator, against per-tensor copies.
  b   POPI on a random-initialised Qwen2.5-0.5B config (bf16, CUDA): ms per scored
      prompt (8 responses x 256 tokens, prompt 128), `POPIProjector.project_groups`
      per prompt, with `batch_tokens` (the spec's default and 4 groups per pass) and
      with `params=["last:4"]` where the projector takes it, against a plain forward
      + backward of the same POPI loss without hooks. The notes say which path ran
      (grouped or one backward per prompt) and whether the Triton kernel did (the
      0.5B config ties its head to the embedding; the grouped path sums both parts,
      and an untied copy is measured only if a grouped pass refuses the tie).
  c   one bf16 ZeRO-3 GRPO step (`ZeroGRPOTrainer`, NCCL, world size 1).
  d   NCCL weight sync (`weight_sync.send_weights` over a `SyncGroup`): world 1
      (packing + NCCL launch only) or, with 2+ GPUs, a real broadcast to a receiver
      process on cuda:1.
  e   the vLLM engine tests (tests/test_vllm_engine.py) if `import vllm` works.

Every row runs in its own subprocess with its own timeout (so a hang, a CUDA
crash or an NCCL abort costs that row only), and all rows share one time budget
(default 450 s: the whole check fits 8 minutes). A row that raises prints its
error type and message. Nothing is downloaded: models are built from configs
with random weights.

    scripts/gpu_check.sh                  # all rows
    scripts/gpu_check.sh --rows a,b       # some rows
    scripts/gpu_check.sh --dry-run        # imports and configs only (works on a CPU machine)

Environment: OUT (the table also goes to $OUT/gpu_check.md, row logs to
$OUT/gpu_check_logs/), GPU_CHECK_PROJ_N (coordinates of row a, default 1.5e9),
GPU_CHECK_TORCH_ADAM=1 (row c: torch's AdamW instead of DeepSpeed's FusedAdam,
which may need to JIT-compile a CUDA op), GPU_CHECK_GRPO_PROMPTS (row c batch,
default 16 prompts x 8 responses). Harness self-test without a GPU (checks the
script's logic, measures nothing): GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1
GPU_CHECK_PROJ_N=4e6 scripts/gpu_check.sh --rows a,b,c,d (tiny config, gloo).

Exit status: 0 whenever the table was printed (rows carry their own status);
with --strict, 1 if a row errored or timed out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Row order, titles and per-row timeouts (s). The rows share --budget too.
ROWS = {
    "a": ("projection kernel vs D2D copy", 60),
    "b": ("POPI, random Qwen2.5-0.5B bf16", 110),
    "c": ("bf16 ZeRO-3 GRPO step, NCCL", 140),
    "d": ("NCCL weight sync, 0.5B bf16", 50),
    "e": ("vLLM engine tests", 180),  # in practice capped by what the budget has left
}
DEFAULT_BUDGET_S = 450
PROJ_DIM = 32768
PROMPT_LEN, RESPONSE_LEN, GROUP = 128, 256, 8

# bf16 dense tensor-core peaks (TFLOPS), to turn a measured rate into an MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}

# Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B config.json), written out: nothing can be downloaded.
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
               rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False,
               bos_token_id=151643, eos_token_id=151643)

# Harness self-test, not a measurement: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1 runs rows a-d on
# the CPU (gloo instead of NCCL) with a tiny config of the same architecture and short sequences.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
if os.environ.get("GPU_CHECK_SMOKE") == "1":
    QWEN05B.update(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=1)
    PROMPT_LEN, RESPONSE_LEN = 16, 16


# ---------------------------------------------------------------------------
# Row results


def result(row: str, **fields) -> dict:
    out = {"row": row, "check": ROWS.get(row[:1], ("", 0))[0], "measured": "", "baseline": "", "ratio": "",
           "status": "", "notes": ""}
    out.update(fields)
    return out


class Reporter:
    """Child side: writes the rows measured so far to the result file (a timeout keeps them)."""

    def __init__(self, path: str | None):
        self.path = path
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.rows, f)
            os.replace(tmp, self.path)
        for r in self.rows[-1:]:
            print("ROW", json.dumps(r), flush=True)


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


def _gpu_peak_tflops(name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Shared builders


def qwen_config(tie: bool = True):
    from transformers import Qwen2Config

    return Qwen2Config(**{**QWEN05B, "tie_word_embeddings": tie})


def build_qwen(device, dtype, tie: bool = True, seed: int = 0):
    """A random-initialised Qwen2.5-0.5B architecture on `device` in `dtype`."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(qwen_config(tie))
    finally:
        torch.set_default_dtype(before)
    return model.to(device=device, dtype=dtype)


def random_groups(n: int, vocab: int, seed: int = 1):
    """`n` OfflineGroups: random prompt (128) and response (8 x 256) ids, mixed rewards."""
    import torch

    from cropi.influence.offline import OfflineGroup

    gen = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n):
        prompt = torch.randint(1, vocab, (PROMPT_LEN,), generator=gen).tolist()
        responses = torch.randint(1, vocab, (GROUP, RESPONSE_LEN), generator=gen).tolist()
        # ~ -log(vocab) under a random init: rho = exp(logp - old) stays near 1.
        logprobs = [[-math.log(vocab)] * RESPONSE_LEN for _ in range(GROUP)]
        rewards = [float((i + j) % 2) for j in range(GROUP)]
        groups.append(OfflineGroup(f"p{i}", prompt, responses, logprobs, rewards, 1.0))
    return groups


def sync() -> None:
    if ON_GPU:
        import torch

        torch.cuda.synchronize()


def empty_cache() -> None:
    if ON_GPU:
        import torch

        torch.cuda.empty_cache()


def cuda_best(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(best seconds by CUDA events, best wall seconds) of `fn` over `repeats`, after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    sync()
    best_ev = best_wall = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        fn()
        if ON_GPU:
            end.record()
            end.synchronize()
        wall = time.perf_counter() - t0
        best_wall = min(best_wall, wall)
        best_ev = min(best_ev, start.elapsed_time(end) / 1e3 if ON_GPU else wall)
    return best_ev, best_wall


class KernelCounter:
    """Counts calls of `sketch_triton.sketch_into`, wherever projection.py looks it up."""

    def __init__(self):
        self.calls = 0
        self._undo = []

    def __enter__(self):
        import importlib

        st = importlib.import_module("cropi.influence.sketch_triton")
        proj = importlib.import_module("cropi.influence.projection")
        original = st.sketch_into

        def counted(*a, **k):
            self.calls += 1
            return original(*a, **k)

        mods = [m for name, m in list(sys.modules.items()) if name.startswith("cropi") and m is not None]
        for mod in {id(m): m for m in [st, proj, *mods]}.values():
            if getattr(mod, "sketch_into", None) is original:
                self._undo.append((mod, original))
                mod.sketch_into = counted
        return self

    def __exit__(self, *exc):
        for mod, original in self._undo:
            mod.sketch_into = original
        return False

    def path(self) -> str:
        return "Triton sketch_into" if self.calls else "NOT sketch_into (host path?)"


class CallCounter:
    """Counts calls of `module.attr` (looked up at call time by its module)."""

    def __init__(self, module: str, attr: str):
        self.module, self.attr, self.calls = module, attr, 0

    def __enter__(self):
        import importlib

        self._mod = importlib.import_module(self.module)
        self._orig = getattr(self._mod, self.attr, None)
        if self._orig is not None:
            def counted(*a, **k):
                self.calls += 1
                return self._orig(*a, **k)

            setattr(self._mod, self.attr, counted)
        return self

    def __exit__(self, *exc):
        if self._orig is not None:
            setattr(self._mod, self.attr, self._orig)
        return False


# ---------------------------------------------------------------------------
# Row a: projection


def row_a(rep: Reporter) -> None:
    import torch

    from cropi.influence.projection import SparseProjector

    dev = torch.device(DEVICE)
    n = int(float(os.environ.get("GPU_CHECK_PROJ_N", "1.5e9")))
    g = dst = None
    while n >= 1 << 20:
        try:
            g = torch.empty(n, dtype=torch.bfloat16, device=dev)
            g.normal_()
            dst = torch.empty_like(g)
            break
        except torch.OutOfMemoryError:
            g = dst = None
            empty_cache()
            n //= 2
    if g is None:
        raise RuntimeError("could not allocate even 2^20 bf16 coordinates twice")
    proj = SparseProjector(dim=PROJ_DIM, sparse_ratio=1.0, seed=0)
    size = f"n = {n:.3g} bf16 ({2 * n / 1e9:.2f} GB)"

    copy_s, _ = cuda_best(lambda: dst.copy_(g))
    copy_gbs = 4 * n / copy_s / 1e9  # read + write
    dst = None
    empty_cache()
    rep.add(result("a", measured="(sketch pending)", baseline=f"copy {copy_gbs:.0f} GB/s ({copy_s * 1e3:.2f} ms)",
                   status="partial", notes=size))

    def sketch():
        acc = proj.new_accumulator()
        acc.add("w", g)
        return acc.result()

    def sketch_small():  # compiles the kernel on a small chunk first
        acc = proj.new_accumulator()
        acc.add("w", g[: 1 << 22])
        return acc.result()

    with KernelCounter() as counter:
        sketch_small()
        z = sketch()
        z_dev = z.device.type
        sketch_s, sketch_wall = cuda_best(sketch)
    sketch_gbs = 2 * n / sketch_s / 1e9  # one read of the bf16 gradient
    ratio = sketch_gbs / copy_gbs
    rep.rows[-1] = result(
        "a", measured=f"{sketch_gbs:.0f} GB/s ({sketch_s * 1e3:.2f} ms, wall {sketch_wall * 1e3:.2f} ms)",
        baseline=f"copy {copy_gbs:.0f} GB/s ({copy_s * 1e3:.2f} ms)", ratio=f"{ratio:.2f} (goal >= 0.5)",
        status=("not wired" if not counter.calls else "ok" if ratio >= 0.5 else "below goal"),
        notes=f"{size}; k={PROJ_DIM}, ratio 1.0, block {proj.block}; via Accumulator: {counter.path()} "
              f"({counter.calls} calls), result on {z_dev}; GB/s = 2 B/coord read (sketch) vs 4 B/coord "
              f"read+write (copy); time ratio copy/sketch {copy_s / sketch_s:.2f}")
    rep.flush()

    # a2: the kernel itself, whatever Accumulator.add does with CUDA tensors.
    try:
        from cropi.influence import sketch_triton

        z = torch.zeros(PROJ_DIM, dtype=torch.float32, device=dev)
        args = (0, proj.param_key("w"), proj.threshold, PROJ_DIM, proj.block, float(proj.scale), z)
        direct_s, _ = cuda_best(lambda: sketch_triton.sketch_into(g, *args))
        gbs = 2 * n / direct_s / 1e9
        rep.add(result("a2", check="sketch_into direct (no Accumulator)",
                       measured=f"{gbs:.0f} GB/s ({direct_s * 1e3:.2f} ms)", baseline=f"copy {copy_gbs:.0f} GB/s",
                       ratio=f"{gbs / copy_gbs:.2f} (goal >= 0.5)",
                       status="ok" if gbs / copy_gbs >= 0.5 else "below goal", notes=size))
    except Exception as e:  # noqa: BLE001 - a row reports, never aborts
        traceback.print_exc()
        rep.add(result("a2", check="sketch_into direct (no Accumulator)", status="error", notes=_err(e)))
    g = None
    empty_cache()

    # a3: the gradient as backward hands it over: 290 parameter-shaped tensors.
    try:
        with torch.device("meta"):
            from transformers import Qwen2ForCausalLM

            shapes = [(name, p.shape) for name, p in Qwen2ForCausalLM(qwen_config()).named_parameters()]
        grads = [(name, torch.randn(shape, dtype=torch.bfloat16, device=dev)) for name, shape in shapes]
        outs = [torch.empty_like(t) for _, t in grads]
        total = sum(t.numel() for _, t in grads)

        def all_params():
            acc = proj.new_accumulator()
            for name, t in grads:
                acc.add(name, t)
            return acc.result()

        def copies():
            for (_, t), o in zip(grads, outs):
                o.copy_(t)

        with KernelCounter() as counter:
            acc_s, acc_wall = cuda_best(all_params, repeats=3)
        cp_s, _ = cuda_best(copies, repeats=3)
        gbs, cgbs = 2 * total / acc_s / 1e9, 4 * total / cp_s / 1e9
        rep.add(result("a3", check="Accumulator over the 0.5B model's per-parameter gradients",
                       measured=f"{gbs:.0f} GB/s ({acc_s * 1e3:.2f} ms, wall {acc_wall * 1e3:.2f} ms)",
                       baseline=f"per-tensor copies {cgbs:.0f} GB/s ({cp_s * 1e3:.2f} ms)",
                       ratio=f"{gbs / cgbs:.2f}", status="ok" if counter.calls else "not wired",
                       notes=f"{len(grads)} tensors, {total / 1e6:.0f}M coords bf16; {counter.path()} "
                             f"({counter.calls} calls / {3 + 1} passes)"))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rep.add(result("a3", check="Accumulator over the 0.5B model's per-parameter gradients", status="error", notes=_err(e)))


# ---------------------------------------------------------------------------
# Row b: POPI


def row_b(rep: Reporter) -> None:
    import torch

    from cropi.influence.popi import POPIProjector, popi_loss
    from cropi.influence.projection import SparseProjector

    dev = torch.device(DEVICE)
    model = build_qwen(dev, torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    pad = 0
    timed, warm = 8, 4
    groups = random_groups(warm + timed, QWEN05B["vocab_size"])
    warm_groups, timed_groups = groups[:warm], groups[warm:]
    tokens = GROUP * (PROMPT_LEN + RESPONSE_LEN)
    projector = SparseProjector(dim=PROJ_DIM, sparse_ratio=1.0, seed=0)
    peak = _gpu_peak_tflops(torch.cuda.get_device_name()) if ON_GPU else None

    def plain(gs):
        for g in gs:
            model.zero_grad(set_to_none=True)
            popi_loss(model, g, pad).backward()
        model.zero_grad(set_to_none=True)

    def timed_call(fn, gs) -> float:
        sync()
        t0 = time.perf_counter()
        fn(gs)
        sync()
        return time.perf_counter() - t0

    plain(warm_groups[:1])
    plain_s = min(timed_call(plain, timed_groups) for _ in range(2)) / timed
    tflops = 6 * n_params * tokens / plain_s / 1e12  # tied: matmul params ~ all params
    mfu = f", MFU ~{tflops / peak:.0%} of {peak:.0f}" if peak else ""
    base = f"{plain_s * 1e3:.1f} ms/prompt (~{tflops:.0f} TFLOPS by 6*N*T{mfu})"
    rep.add(result("b", measured="(POPI pending)", baseline=base, status="partial",
                   notes=f"N = {n_params / 1e6:.0f}M, {GROUP} x ({PROMPT_LEN}+{RESPONSE_LEN}) tokens/prompt"))

    measured: dict[str, float] = {}
    notes: list[str] = []
    import inspect

    from cropi.spec import InfluenceSpec

    spec_bt = getattr(InfluenceSpec.model_fields.get("batch_tokens"), "default", None)
    four = 4 * GROUP * (PROMPT_LEN + RESPONSE_LEN)  # 4 groups per pass
    has_params = "params" in inspect.signature(POPIProjector).parameters
    attempts = [("per-prompt", model, {"batch_tokens": None})]
    for bt in dict.fromkeys(b for b in (spec_bt, four) if b):
        attempts.append((f"batch_tokens={bt}", model, {"batch_tokens": bt}))
    if has_params:
        attempts.append((f"last:4 + head, batch_tokens={four}", model, {"batch_tokens": four, "params": ["last:4"]}))
    untied = None
    i = 0
    while i < len(attempts):
        label, m, kwargs = attempts[i]
        i += 1
        popi = POPIProjector(m, projector, pad, **kwargs)
        try:
            with KernelCounter() as counter, CallCounter("cropi.influence.popi", "grouped_gradients") as grouped:
                popi.project_groups(warm_groups if kwargs["batch_tokens"] else warm_groups[:1])
                s = min(timed_call(popi.project_groups, timed_groups) for _ in range(2)) / timed
            measured[label] = s
            path = "grouped" if grouped.calls else "one backward per prompt"
            notes.append(f"{label}: {s * 1e3:.1f} ms ({path}; {counter.path()})")
            fell_back = kwargs["batch_tokens"] and not grouped.calls
        except Exception as e:  # noqa: BLE001 - a row reports, never aborts
            traceback.print_exc()
            notes.append(f"{label}: {_err(e)}")
            fell_back = kwargs["batch_tokens"] and "tied" in str(e)
        finally:
            popi.close()
            m.zero_grad(set_to_none=True)
        if fell_back and m is model and untied is None:
            # The grouped path refuses tied weights: measure it on an untied copy too (same FLOPs).
            untied = build_qwen(dev, torch.bfloat16, tie=False).eval()
            untied.load_state_dict(model.state_dict(), strict=False)
            with torch.no_grad():
                untied.lm_head.weight.copy_(model.get_output_embeddings().weight)
            attempts.append((f"{label}, untied copy", untied, kwargs))
        empty_cache()
        rep.rows[-1]["notes"] = "; ".join(notes)
        rep.flush()
    if not measured:
        raise RuntimeError("no POPI variant ran: " + "; ".join(notes))
    best_label = min(measured, key=measured.get)
    best = measured[best_label]
    ratio = best / plain_s
    rep.rows[-1] = result(
        "b", measured=f"{best * 1e3:.1f} ms/prompt ({best_label})", baseline=base,
        ratio=f"{ratio:.2f} (time POPI / plain)", status="ok",
        notes=f"N = {n_params / 1e6:.0f}M, k={PROJ_DIM}; " + "; ".join(notes)
              + "; the grouped path runs each prompt once per group, the plain pass G times")
    rep.flush()


# ---------------------------------------------------------------------------
# Row c: ZeRO-3 GRPO step


def _grpo_batch(prompts: int, vocab: int):
    import torch

    from cropi.rollout.base import Trajectory

    gen = torch.Generator().manual_seed(2)
    groups, rewards = [], []
    for i in range(prompts):
        prompt = torch.randint(1, vocab, (PROMPT_LEN,), generator=gen).tolist()
        groups.append([Trajectory(prompt_ids=prompt, response_ids=torch.randint(1, vocab, (RESPONSE_LEN,),
                                                                                  generator=gen).tolist(),
                                  logprobs=[-math.log(vocab)] * RESPONSE_LEN, text="", finished=False,
                                  temperature=1.0)
                       for _ in range(GROUP)])
        rewards.append([float((i + j) % 2) for j in range(GROUP)])
    return groups, rewards


def row_c(rep: Reporter) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if ON_GPU:
        torch.cuda.set_device(0)
    import cropi.rl.zero3 as zero3
    from cropi.spec import RLSpec

    notes = []
    if os.environ.get("GPU_CHECK_TORCH_ADAM") == "1":
        _torch_adam(zero3)
        notes.append("torch AdamW (GPU_CHECK_TORCH_ADAM=1)")
    prompts = int(os.environ.get("GPU_CHECK_GRPO_PROMPTS", "16"))
    rl = RLSpec(lr=1e-6, micro_batch=8, warmup_steps=1)
    groups, rewards = _grpo_batch(prompts, QWEN05B["vocab_size"])
    dev = torch.device(DEVICE)

    def trainer():
        model = build_qwen(dev, torch.bfloat16)
        ref = build_qwen(dev, torch.bfloat16)
        t0 = time.perf_counter()
        tr = zero3.ZeroGRPOTrainer(model, ref, 0, rl, temperature=1.0)
        return tr, time.perf_counter() - t0

    try:
        tr, init_s = trainer()
    except Exception as e:  # noqa: BLE001 - most likely FusedAdam's JIT build; retry on torch's AdamW
        if "torch AdamW" in " ".join(notes):
            raise
        traceback.print_exc()
        notes.append(f"project config failed ({_err(e)}); retried with torch AdamW")
        _torch_adam(zero3)
        empty_cache()
        tr, init_s = trainer()
    shape = f"{prompts} prompts x {GROUP} x ({PROMPT_LEN}+{RESPONSE_LEN}) tokens, micro_batch {rl.micro_batch}"
    rep.add(result("c", measured="(steps pending)", baseline=f"init {init_s:.1f} s", status="partial",
                   notes="; ".join([shape, *notes])))
    times, stats = [], {}
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        stats = tr.step(groups, rewards)
        sync()
        times.append(time.perf_counter() - t0)
    tokens = prompts * GROUP * (PROMPT_LEN + RESPONSE_LEN)
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in tr.model.parameters())
    tflops = 8 * n * tokens / times[-1] / 1e12  # policy fwd+bwd (6N) + reference fwd (2N) per token
    rep.rows[-1] = result(
        "c", measured=f"{times[-1]:.2f} s/step (first {times[0]:.2f} s)", baseline=f"init {init_s:.1f} s",
        ratio=f"~{tflops:.0f} TFLOPS (8*N*T)",
        status="ok" if all(math.isfinite(v) for v in stats.values() if isinstance(v, float)) else "non-finite",
        notes="; ".join([shape, f"world size {tr.world_size}, {str(next(tr.model.parameters()).dtype)[6:]}, ZeRO-3",
                         *notes,
                         f"loss {stats.get('loss', float('nan')):.4g}, grad_norm {stats.get('grad_norm', float('nan')):.3g}"]))
    rep.flush()


def _torch_adam(zero3) -> None:
    original = zero3.deepspeed_config

    def patched(*a, **k):
        config = original(*a, **k)
        if config["optimizer"]["type"] == "AdamW":
            config["optimizer"]["params"]["torch_adam"] = True
        return config

    zero3.deepspeed_config = patched


# ---------------------------------------------------------------------------
# Row d: weight sync


def _receiver(port: int, done) -> None:
    """Receiver process on cuda:1 (2+ GPUs only): applies every version until the sender closes."""
    import torch

    from cropi.executors.ray.weight_sync import SyncClosed, SyncGroup, copy_weights, named_weights, receive_weights

    torch.cuda.set_device(1)
    model = build_qwen(torch.device("cuda", 1), torch.bfloat16, seed=1)
    targets = dict(named_weights(model))
    group = SyncGroup.join_receiver("127.0.0.1", port, backend="nccl", timeout_s=60)
    versions = 0
    try:
        while True:
            receive_weights(group, lambda named, v: copy_weights(targets, named))
            versions += 1
    except SyncClosed:
        pass
    finally:
        done.put(versions)


def row_d(rep: Reporter) -> None:
    import multiprocessing as mp

    import torch

    from cropi.executors.ray.weight_sync import SyncGroup, send_weights

    if ON_GPU:
        torch.cuda.set_device(0)
    model = build_qwen(torch.device(DEVICE), torch.bfloat16)
    two = ON_GPU and torch.cuda.device_count() >= 2
    port = _free_port()
    proc = done = None
    if two:
        ctx = mp.get_context("spawn")
        done = ctx.Queue()
        proc = ctx.Process(target=_receiver, args=(port, done), daemon=True)
        proc.start()
    group = SyncGroup.create_sender("127.0.0.1", port, receivers=1 if two else 0,
                                     backend="nccl" if ON_GPU else "gloo", timeout_s=60)
    best, stats = math.inf, {}
    try:
        for version in range(4):  # 1 warm-up + 3 timed
            sync()
            t0 = time.perf_counter()
            stats = send_weights(model, group, version, bucket_bytes=64 << 20)
            sync()
            if version:
                best = min(best, time.perf_counter() - t0)
    finally:
        group.close()
    received = None
    if proc is not None:
        try:
            received = done.get(timeout=30)
        except Exception:  # noqa: BLE001 - queue.Empty: the receiver died; its log says why
            received = None
        proc.join(5)
    gbs = stats["bytes"] / best / 1e9
    how = (f"2 processes, cuda:0 -> cuda:1, receiver applied {received} versions" if two else
           "world size 1 (one GPU): gather + pack into 64 MiB buckets + NCCL launch, no transfer; "
           "a real broadcast needs 2 GPUs")
    rep.add(result("d", measured=f"{best:.3f} s, {gbs:.1f} GB/s", baseline="", ratio="",
                   status="ok" if (not two or received == 4) else "receiver incomplete",
                   notes=f"{stats['bytes'] / 1e9:.2f} GB in {stats['buckets']} buckets, {stats['tensors']} tensors; "
                         f"{how}"))


# ---------------------------------------------------------------------------
# Row e: vLLM


def row_e(rep: Reporter, timeout_s: float) -> None:
    try:
        import vllm
    except Exception as e:  # noqa: BLE001
        rep.add(result("e", measured="vLLM not importable", status="n/a", notes=_err(e)))
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm_engine.py"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, timeout_s - 10))
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-300:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-300:]
        rep.add(result("e", measured=f"pytest timed out after {time.perf_counter() - t0:.0f} s", status="timeout",
                       notes=f"vllm {vllm.__version__}; {' '.join(str(tail).split())[-200:]}"))
        return
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no pytest output)"
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    rep.add(result("e", measured=" ".join(summary.strip("= ").split()), baseline="",
                   ratio="", status="ok" if proc.returncode == 0 else f"rc {proc.returncode}",
                   notes=f"vllm {vllm.__version__}; {' '.join(cmd[3:])}"
                         + (f"; {'; '.join(failed)[:400]}" if failed else "")))


CHILDREN = {"a": row_a, "b": row_b, "c": row_c, "d": row_d}


def run_child(row: str, result_path: str | None, timeout_s: float) -> int:
    rep = Reporter(result_path)
    try:
        import torch

        if row != "e" and ON_GPU and not torch.cuda.is_available():
            rep.add(result(row, measured="no CUDA device", status="skipped"))
            return 0
        if row == "e":
            row_e(rep, timeout_s)
        else:
            CHILDREN[row](rep)
    except BaseException as e:  # noqa: BLE001 - the row reports its error
        traceback.print_exc()
        error = result(row, status="error", notes=_err(e))
        if rep.rows and rep.rows[-1].get("status") == "partial":
            last = rep.rows.pop()
            error.update(measured=last["measured"], baseline=last["baseline"],
                         notes=f"{_err(e)}; before it: {last['notes']}")
        rep.add(error)
    return 0


# ---------------------------------------------------------------------------
# Parent


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    head = ["row", "check", "measured", "baseline", "ratio", "status", "notes"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(h, "")) for h in head) + " |")
    return "\n".join(out)


def _run_row(row: str, timeout_s: float, log_dir: Path) -> list[dict]:
    fd, result_path = tempfile.mkstemp(prefix=f"gpu_check_{row}_", suffix=".json")
    os.close(fd)
    os.unlink(result_path)
    log = log_dir / f"row_{row}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--result", result_path,
           "--child-timeout", f"{timeout_s:.0f}"]
    t0 = time.perf_counter()
    status = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            if rc != 0:
                status = f"child exited {rc}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout_s:.0f} s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the row's own process group: its pytest / receiver too
            except ProcessLookupError:
                pass
            proc.wait()
    elapsed = time.perf_counter() - t0
    rows: list[dict] = []
    if os.path.exists(result_path):
        with open(result_path) as f:
            rows = json.load(f)
        os.unlink(result_path)
    if status:
        tail = ""
        try:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            tail = lines[-1][:200] if lines else ""
        except OSError:
            pass
        if rows and rows[-1].get("status") in ("partial", ""):
            rows[-1]["status"] = status
        elif not any(r["row"] == row for r in rows):
            rows.append(result(row, status=status, notes=f"last log line: {tail}"))
        else:
            rows.append(result(row + "+", check="(rest of the row)", status=status, notes=f"last log line: {tail}"))
    if rows:
        rows[0]["notes"] = f"{rows[0].get('notes') or ''} [row took {elapsed:.0f} s]".strip()
    return rows


def dry_run(selected: list[str]) -> list[dict]:
    """Imports and configs only: what each row needs, checked without a GPU."""
    needs = {
        "a": ["cropi.influence.projection", "cropi.influence.sketch_triton", "triton"],
        "b": ["cropi.influence.popi", "cropi.influence.offline", "transformers"],
        "c": ["cropi.rl.zero3", "deepspeed", "cropi.spec"],
        "d": ["cropi.executors.ray.weight_sync"],
        "e": ["vllm"],
    }
    import importlib

    rows = []
    for row in selected:
        bad = []
        for mod in needs[row]:
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001
                bad.append(f"{mod}: {_err(e)}")
        notes = "; ".join(bad) if bad else "imports " + ", ".join(needs[row])
        if row == "b" and not bad:
            import torch
            from transformers import Qwen2ForCausalLM

            with torch.device("meta"):
                m = Qwen2ForCausalLM(qwen_config())
            notes += f"; Qwen2.5-0.5B config: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params, " \
                     f"{len(list(m.parameters()))} tensors"
        measured = "vLLM not importable" if row == "e" and bad else "dry run"
        rows.append(result(row, measured=measured, status="import error" if bad and row != "e" else "dry run",
                           notes=notes))
    return rows


def device_info_child() -> int:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(count=torch.cuda.device_count(), name=props.name, mem_gib=props.total_memory / 2**30,
                    cuda_version=torch.version.cuda)
    print(json.dumps(info))
    return 0


def device_info() -> dict:
    """torch's view of the devices, from a subprocess: the parent holds no CUDA context (vLLM's memory check
    and the rows' allocations see the whole GPU)."""
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "info"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"cuda": False, "error": f"; device query failed: {_err(e)}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Rows: " + "; ".join(f"{k}: {v[0]} ({v[1]} s)" for k, v in ROWS.items()))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all rows together")
    ap.add_argument("--dry-run", action="store_true", help="check imports and configs only, run nothing on a GPU")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a row errored or timed out")
    ap.add_argument("--child", choices=[*ROWS, "info"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--child-timeout", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "info":
        return device_info_child()
    if args.child:
        return run_child(args.child, args.result, args.child_timeout)

    start = time.perf_counter()
    selected = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in selected if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_dir = (out_dir / "gpu_check_logs") if out_dir else Path(tempfile.mkdtemp(prefix="gpu_check_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)

    import importlib.util

    info = device_info()
    cuda = bool(info.get("cuda"))
    if not ON_GPU:
        header = f"GPU check: HARNESS SELF-TEST on {DEVICE} (GPU_CHECK_DEVICE), not a measurement"
    elif cuda:
        header = (f"GPU check: {info['count']} x {info['name']} ({info['mem_gib']:.0f} GiB), "
                  f"torch {info['torch']}, CUDA {info['cuda_version']}")
    else:
        header = f"GPU check: no CUDA device (torch {info.get('torch', '?')}{info.get('error', '')})"
    if args.dry_run:
        rows = dry_run(selected)
        header += ", dry run"
    else:
        rows = []
        deadline = start + args.budget
        for row in selected:
            left = deadline - time.perf_counter()
            if not cuda and row != "e" and ON_GPU:
                rows.append(result(row, measured="no CUDA device", status="skipped"))
                continue
            if not cuda and row == "e":
                has = importlib.util.find_spec("vllm") is not None
                rows.append(result(row, measured="no CUDA device" if has else "vLLM not importable",
                                   status="skipped" if has else "n/a",
                                   notes="" if has else "ModuleNotFoundError: No module named 'vllm'"))
                continue
            if left < 15:
                rows.append(result(row, status="skipped", notes=f"time budget spent ({args.budget:.0f} s)"))
                continue
            print(f"[gpu_check] row {row}: {ROWS[row][0]} (timeout {min(ROWS[row][1], left):.0f} s)",
                  file=sys.stderr, flush=True)
            try:
                rows.extend(_run_row(row, min(ROWS[row][1], left), log_dir))
            except Exception as e:  # noqa: BLE001 - the harness itself must still print the table
                rows.append(result(row, status="error", notes=f"harness: {_err(e)}"))
    wall = time.perf_counter() - start
    text = f"{header}\n\n{table(rows)}\n\nTotal wall time: {wall:.0f} s (row logs: {log_dir})\n"
    print(text)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check.md").write_text(text)
    if args.strict and any(r.get("status", "").startswith(("error", "timeout", "child", "import")) for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

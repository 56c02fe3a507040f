"""Rollout with vLLM (GPU): the same `Trajectory` contract as the HF engine.

vLLM is an optional extra (`pip install 'cropi[gpu]'`, CUDA machines only: it
pins its own torch), so it is imported when an engine is built, never when
this module is.

How the contract is met:

* Prompts are tokenised by cropi (the model's HF tokenizer, as the HF
  engine does) and sent as token ids, so `prompt_ids` match across engines.
* Log-probs: the engine runs with `logprobs_mode="processed_logprobs"` and
  asks for the sampled token's log-prob (`logprobs=0`). vLLM's default
  (`raw_logprobs`) reports log softmax of the *untempered* logits; the
  processed mode reports them after temperature, i.e. log softmax(logits/T),
  which is what the trainer recomputes. Greedy requests (temperature 0) get
  temperature-1 log-probs, as in the HF engine. With top_p < 1 the processed
  log-probs are those of the renormalised nucleus, log p_T(x) - log(mass of
  the nucleus): above the contract's full tempered distribution by
  -log(mass), a per-token amount. vLLM has no mode between "before
  temperature" and "after top-p", so with top_p < 1 the behaviour log-probs
  are biased upwards and the first PPO ratio of a step starts at the
  nucleus mass rather than 1. The paper's setting, and cropi's default, is
  top_p = 1, where they are exact.
* Seeds: every sequence (prompt i, sample j of a request) gets its own seed
  derived from (SamplingParams.seed, i, j), so a request's samples do not
  depend on what else the engine is running. They are not the HF engine's
  draws (different sampler), and vLLM's batched kernels make results depend
  slightly on batch composition unless VLLM_BATCH_INVARIANT=1 is set where
  supported.
* The model's generation_config.json is ignored (`generation_config="vllm"`):
  its default top_k/top_p would silently change the distribution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cropi.seeding import stream_seed
from cropi.errors import InputError
from cropi.rollout.base import SamplingParams, Trajectory

WORKER_EXTENSION = "cropi.rollout.vllm_worker.WeightUpdateExtension"
# Tensors per collective_rpc call: bounds the pickled message and the workers' staging memory.
DEFAULT_BUCKET_BYTES = 256 << 20

Request = tuple[Sequence[str], int, SamplingParams]


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise InputError(
            "rollout.engine: vllm needs the vLLM package, which is not installed here "
            f"({err}). Install cropi's `gpu` extra on a CUDA machine: pip install 'cropi[gpu]'"
        ) from None
    return vllm


def checkpoint_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of an HF folder's safetensors files, read one tensor at a time."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has keys(), no __iter__)
                yield name, f.get_tensor(name)


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of about `bucket_bytes` (a larger tensor travels alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class VLLMRolloutEngine:
    """A `RolloutEngine` over `vllm.LLM`, with a weight-update entry point for RL."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        max_model_len: int | None = None,
        distributed_executor_backend: str | None = None,
        enforce_eager: bool = False,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        **engine_kwargs: Any,
    ):
        vllm = import_vllm()
        from transformers import AutoTokenizer

        from cropi.models.loading import resolve_model_path

        resolved = resolve_model_path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.bucket_bytes = bucket_bytes
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=resolved,
            tokenizer=resolved,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            distributed_executor_backend=distributed_executor_backend,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            worker_extension_cls=WORKER_EXTENSION,
            **engine_kwargs,
        )

    # ----------------------------------------------------------- sampling
    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingParams) -> list[list[Trajectory]]:
        return self.generate_many([(prompts, n, sampling)])[0]

    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Trajectory]]]:
        """Several requests in one `LLM.generate` call: vLLM's continuous batching sees them all."""
        inputs, params, layout = [], [], []
        for prompts, n, sp in requests:
            encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
            layout.append((encoded, n, sp))
            for i, ids in enumerate(encoded):
                for j in range(n):
                    inputs.append({"prompt_token_ids": ids})
                    params.append(self._params(sp, i, j))
        outputs = iter(self.llm.generate(inputs, params, use_tqdm=False)) if inputs else iter(())
        results = []
        for encoded, n, sp in layout:
            temperature = 1.0 if sp.greedy else sp.temperature
            results.append([[self._trajectory(ids, next(outputs).outputs[0], temperature) for _ in range(n)]
                            for ids in encoded])
        return results

    def _params(self, sp: SamplingParams, prompt_index: int, sample_index: int) -> Any:
        if sp.greedy:
            return self._sampling_params(n=1, temperature=0.0, max_tokens=sp.max_new_tokens, logprobs=0,
                                         detokenize=False)
        return self._sampling_params(
            n=1, temperature=sp.temperature, top_p=sp.top_p, max_tokens=sp.max_new_tokens, logprobs=0,
            seed=stream_seed("vllm-rollout", sp.seed, prompt_index, sample_index) % 2**63, detokenize=False,
        )

    def _trajectory(self, prompt_ids: list[int], completion: Any, temperature: float) -> Trajectory:
        eos = self.tokenizer.eos_token_id
        response = list(completion.token_ids)
        # vLLM keeps the EOS it stopped on in token_ids (and reports its log-prob), as the HF engine does.
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, response)]
        finished = bool(response) and response[-1] == eos
        body = response[:-1] if finished else response
        return Trajectory(prompt_ids=list(prompt_ids), response_ids=response, logprobs=logprobs,
                          text=self.tokenizer.decode(body, skip_special_tokens=True), finished=finished,
                          temperature=temperature)

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float = 1.0) -> list[float]:
        """Teacher-forced log-probs of a fixed response under the engine's current weights.

        vLLM's prompt log-probs are those of the untempered distribution (and
        only the requested token's, not the vocabulary needed to re-temper),
        so only temperature 1 is served here.
        """
        if temperature != 1.0:
            raise ValueError(f"vLLM scores fixed responses at temperature 1 only, not {temperature}")
        params = self._sampling_params(n=1, temperature=1.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        ids = list(prompt_ids) + list(response_ids)
        out = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        # prompt_logprobs[k] scores ids[k] given ids[:k] (entry 0 is None).
        return [out.prompt_logprobs[len(prompt_ids) + t][token].logprob for t, token in enumerate(response_ids)]

    # ----------------------------------------------------------- weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new weights (HF names, full tensors) into the running engine; returns how many.

        Tensors go to every worker through `collective_rpc` in buckets of
        about `bucket_bytes`, moved to host memory first (the RPC pickles
        them). The prefix cache is reset afterwards: its KV blocks were
        computed with the old weights.
        """
        count = 0
        for bucket in buckets(named_tensors, self.bucket_bytes):
            host = [(name, t.detach().to("cpu").contiguous()) for name, t in bucket]
            self.llm.collective_rpc("cropi_load_weights", args=(host,))
            count += len(host)
        self.llm.reset_prefix_cache()
        return count

    def load_weights_from_path(self, folder: str | Path) -> int:
        """Load the weights of an HF checkpoint folder (e.g. a stage checkpoint) into the running engine."""
        return self.load_weights(checkpoint_tensors(folder))

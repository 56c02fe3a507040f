"""Rollout with a plain transformers model: a KV-cached sampling loop.

Written out rather than calling `model.generate` so that the log-probs are
exactly those of the distribution we sample from, sampling is driven by an
explicit seeded generator, and the padding layout matches the trainer's
teacher-forced recomputation (left-padded prompt, then the response).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from cropi.rollout.base import SamplingParams, Trajectory


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the mass before it already exceeds top_p.
    drop_sorted = (cum - sorted_logits.softmax(-1)) > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class HFRolloutEngine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingParams) -> list[list[Trajectory]]:
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        flat = [ids for ids in encoded for _ in range(n)]
        # On CUDA the generator lives there too: no host round-trip per sampled token.
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(sampling.seed)
        out: list[Trajectory] = []
        for start in range(0, len(flat), self.batch_size):
            out.extend(self._generate_batch(flat[start : start + self.batch_size], sampling, gen))
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(
        self, prompt_ids: list[list[int]], sp: SamplingParams, gen: torch.Generator
    ) -> list[Trajectory]:
        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        width = max(map(len, prompt_ids))
        pad, eos = tok.pad_token_id, tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        was_training = model.training
        model.eval()
        try:
            kv = {self._cache_kw: cache, "use_cache": True}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kv).logits[:, -1].float()
            batch = ids.shape[0]
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            tokens, logps = [], []
            for t in range(sp.max_new_tokens):
                scaled = logits if sp.greedy else logits / sp.temperature
                logp = torch.log_softmax(scaled, dim=-1)
                if sp.greedy:
                    nxt = logp.argmax(-1)
                else:
                    probs = _top_p_filter(scaled, sp.top_p).softmax(-1)
                    if gen.device.type == "cuda":
                        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
                    else:
                        nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(device)
                lp = logp.gather(-1, nxt[:, None]).squeeze(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                tokens.append(nxt)
                logps.append(torch.where(done, torch.zeros_like(lp), lp))
                done = done | (nxt == eos)
                # Asking whether all are done syncs with the device: on CUDA only every 16 tokens
                # (the extra steps after the last EOS add padding that the decoding below cuts off).
                if (device.type != "cuda" or t % 16 == 15) and bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                positions = positions[:, -1:] + 1
                logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, **kv).logits[
                    :, -1
                ].float()
        finally:
            model.train(was_training)
        tok_mat = torch.stack(tokens, 1).tolist()
        lp_mat = torch.stack(logps, 1).tolist()
        results = []
        for row, (p, toks, lps) in enumerate(zip(prompt_ids, tok_mat, lp_mat)):
            length = toks.index(eos) + 1 if eos in toks else len(toks)
            response = toks[:length]
            finished = bool(response) and response[-1] == eos
            body = response[:-1] if finished else response
            results.append(
                Trajectory(
                    prompt_ids=list(p),
                    response_ids=response,
                    logprobs=lps[:length],
                    text=tok.decode(body, skip_special_tokens=True),
                    finished=finished,
                    temperature=1.0 if sp.greedy else sp.temperature,
                )
            )
        return results

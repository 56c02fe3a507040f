"""Batched POPI (issue F2): many prompts' projected gradients per pass, each prompt's
own gradient, equal to the one-backward-per-prompt loop; and gradients of a parameter subset."""

import copy
import dataclasses
from functools import partial

import numpy as np
import pytest
import torch

from cropi.curriculum.layout import offline_part_key, offline_prefix
from cropi.data import arith
from cropi.errors import InputError
from cropi.influence.offline import collect_offline, load_offline
from cropi.influence.param_subset import select_parameters
from cropi.influence.popi import POPIProjector, full_flat_gradient, popi_loss
from cropi.influence.popi_batched import chunks, padded_tokens
from cropi.influence.projection import SparseProjector
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore

PATTERN = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def groups(tiny_model, tmp_path_factory):
    """Offline groups of prompts and responses of many lengths; every fifth one ineligible."""
    model, tok = tiny_model
    store = LocalStore(tmp_path_factory.mktemp("store"))
    prompts = arith.generate(30, seed="batched", skills=("add", "mul", "rev"), digits=(1, 3))
    collect_offline(HFRolloutEngine(model, tok), store, partial(offline_part_key, "job", "pool"), "pool", prompts,
                    n=8, temperature=0.5, max_new_tokens=7, seed=0, part_size=16)
    loaded = load_offline(store, offline_prefix("job", "pool"))
    return [dataclasses.replace(g, rewards=[1.0] * 8 if i % 5 == 4 else PATTERN) for i, g in enumerate(loaded)]


def project(model, tok, groups, **kwargs):
    popi = POPIProjector(model, SparseProjector(dim=1024, sparse_ratio=1.0, seed=3), tok.pad_token_id, **kwargs)
    try:
        return popi.project_groups(groups)
    finally:
        popi.close()


def relative_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)


def test_lengths_vary_so_chunks_really_pad(groups):
    assert len({len(g.prompt_ids) for g in groups}) > 2
    assert len({len(r) for g in groups for r in g.response_ids}) > 2


@pytest.mark.parametrize("batch_tokens", [64, 400, 100_000])
def test_batched_vectors_equal_the_per_prompt_loop(tiny_model, groups, batch_tokens):
    model, tok = tiny_model
    loop = project(model, tok, groups)
    batched = project(model, tok, groups, batch_tokens=batch_tokens)
    assert batched.prompt_ids == loop.prompt_ids
    assert np.array_equal(batched.eligible, loop.eligible) and not batched.eligible.all()
    assert not batched.vectors[~batched.eligible].any()
    assert relative_errors(batched.vectors[loop.eligible], loop.vectors[loop.eligible]).max() < 1e-5


def test_batched_vectors_are_bit_identical_run_to_run(tiny_model, groups):
    model, tok = tiny_model
    a = project(model, tok, groups, batch_tokens=400)
    b = project(model, tok, groups, batch_tokens=400)
    assert np.array_equal(a.vectors, b.vectors)


def test_batched_scoring_away_from_the_behaviour_policy_matches_too(tiny_model, groups):
    model, tok = tiny_model
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(0)) * 0.05)
    loop = project(moved, tok, groups[:8])
    batched = project(moved, tok, groups[:8], batch_tokens=1000)
    ok = loop.eligible
    assert relative_errors(batched.vectors[ok], loop.vectors[ok]).max() < 1e-5


def test_a_pass_holds_at_most_batch_tokens_and_max_groups(groups):
    eligible = [g for g in groups if g.eligible]
    for part in chunks(eligible, 300, max_groups=3):
        members = [eligible[i] for i in part]
        assert len(members) <= 3
        assert len(members) == 1 or padded_tokens(members) <= 300
    assert sorted(i for part in chunks(eligible, 300) for i in part) == list(range(len(eligible)))


def test_last_layers_select_the_top_of_the_model(tiny_model):
    model, _ = tiny_model
    chosen = select_parameters(model, ["last:1"])
    top = model.config.num_hidden_layers - 1
    assert any(n.startswith(f"model.layers.{top}.") for n in chosen)
    assert not any(n.startswith(f"model.layers.{top - 1}.") for n in chosen)
    assert "lm_head.weight" in chosen and "model.norm.weight" in chosen
    assert "model.embed_tokens.weight" not in chosen
    assert select_parameters(model, ["lm_head.*"]) == {"lm_head.weight"}


def test_a_pattern_that_matches_nothing_is_refused_by_position(tiny_model):
    model, _ = tiny_model
    with pytest.raises(InputError, match=r"influence.params\[1\]"):
        select_parameters(model, ["lm_head.*", "decoder.*"])


@pytest.mark.parametrize("batch_tokens", [None, 400])
def test_a_parameter_subset_projects_exactly_that_part_of_the_gradient(tiny_model, groups, batch_tokens):
    model, tok = tiny_model
    projector = SparseProjector(dim=1024, sparse_ratio=1.0, seed=3)
    popi = POPIProjector(model, projector, tok.pad_token_id, batch_tokens=batch_tokens, params=["last:1"])
    reached = []  # backward stops below the lowest selected layer: it never reaches layer 0
    hook = model.model.layers[0].register_full_backward_hook(lambda *args: reached.append(1))
    try:
        out = popi.project_groups(groups[:3])
    finally:
        popi.close()
        hook.remove()
    assert not reached
    chosen = select_parameters(model, ["last:1"])
    for i, group in enumerate(groups[:3]):
        flat = full_flat_gradient(model, lambda: popi_loss(model, group, tok.pad_token_id))
        reference = projector.project_flat([(n, g) for n, g in flat if n in chosen]).numpy()
        assert relative_errors(out.vectors[i:i + 1], reference[None]).max() < 1e-5
    assert all(p.requires_grad for p in model.parameters())  # the subset was frozen only while scoring


def test_a_head_tied_to_the_embedding_gets_both_gradients_in_batches_too(tiny_model, groups):
    """Qwen2.5-0.5B/1.5B tie lm_head to the input embedding: one parameter, two modules."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok = tiny_model
    torch.manual_seed(0)
    tied = Qwen2ForCausalLM(Qwen2Config(vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, pad_token_id=tok.pad_token_id))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    loop = project(tied, tok, groups[:10])
    batched = project(tied, tok, groups[:10], batch_tokens=600)
    ok = loop.eligible
    assert relative_errors(batched.vectors[ok], loop.vectors[ok]).max() < 1e-5


def test_the_batched_bench_reports_speed_equality_and_identity(tmp_path, mixed_rewards):
    import yaml

    from cropi.bench.popi_batched import run_batched_popi_bench

    from .jobs import tiny_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(offline={"n_pool": 8, "n_valid": 4, "temperature": 1.0},
                                           name="bench")))
    report = run_batched_popi_bench(job=job, prompts=30, repeats=1, batch_tokens=300, reference_prompts=4)
    assert report["scored_prompts"] > 2 and report["batch_tokens"] == 300
    assert report["max_relative_error"] < 1e-5 and report["bit_identical_run_to_run"]
    assert report["per_prompt_loop_vs_float64"] < 1e-4 and report["batched_vs_float64"] < 1e-4
    assert report["speedup"] == pytest.approx(report["per_prompt_loop_ms"] / report["batched_ms"])

"""The built-in tiny model: a normal HF folder, cached, deterministic."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi.errors import InputError
from cropi.models.loading import load_policy, resolve_model_path
from cropi.models.tiny import TinyRecipe, ensure_tiny_model
from cropi.models.tokenizer import build_char_tokenizer

from .conftest import TEST_MODEL


def test_char_tokenizer_round_trips_and_adds_bos():
    tok = build_char_tokenizer()
    ids = tok("max(12,3)= -7")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len("max(12,3)= -7")
    assert tok.decode(ids, skip_special_tokens=True) == "max(12,3)= -7"


def test_builtin_model_is_a_standard_hf_folder(tiny_model):
    path = resolve_model_path(TEST_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tok("12+3=")["input_ids"] == tiny_model[1]("12+3=")["input_ids"]
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    for a, b in zip(model.parameters(), tiny_model[0].parameters()):
        assert torch.equal(a, b)


def test_second_use_hits_the_cache(tiny_model):
    path = resolve_model_path(TEST_MODEL)
    mtime = os.path.getmtime(os.path.join(path, "config.json"))
    calls = []
    assert str(ensure_tiny_model(TEST_MODEL.split("?", 1)[1], lambda *a: calls.append(a))) == path
    assert not calls and os.path.getmtime(os.path.join(path, "config.json")) == mtime


def test_warm_start_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("CROPI_CACHE", str(tmp_path))
    query = "sft_steps=3&sft_batch=8&layers=1&hidden=32&intermediate=64&heads=2"
    first = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(query))
    monkeypatch.setenv("CROPI_CACHE", str(tmp_path / "other"))
    second = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(query))
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_recipe_options_are_validated():
    assert TinyRecipe.from_query("sft_steps=5").sft_steps == 5
    with pytest.raises(InputError, match="unknown option"):
        TinyRecipe.from_query("depth=3")
    with pytest.raises(InputError, match="not a valid number"):
        TinyRecipe.from_query("sft_steps=many")


def test_missing_model_paths_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_policy(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_policy(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="unknown built-in model"):
        load_policy("builtin:gpt-5")

"""The model fingerprint: equal for the same weights (two builds, a save and reload, float32 or bfloat16), different
for other weights (another seed, one edited layer) or another computation (RoPE base); one function for the whole
library."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import kvsqueeze as kvs
import kvsqueeze.cachefile
import kvsqueeze.calibration
import kvsqueeze.calibration.store
from kvsqueeze.fingerprint import SAMPLES_PER_TENSOR, model_fingerprint, weight_samples


def test_one_fingerprint_for_the_library():
    assert kvsqueeze.cachefile.model_fingerprint is model_fingerprint
    assert kvsqueeze.calibration.store.model_fingerprint is model_fingerprint
    assert kvsqueeze.calibration.model_fingerprint is model_fingerprint


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_same_model_twice_is_equal(family, make_model):
    first = model_fingerprint(make_model(family))
    assert len(first) == 24 and int(first, 16) >= 0
    assert model_fingerprint(make_model(family)) == first  # a second build with the same weights


def test_save_and_reload_in_float32_or_bfloat16_is_equal(tmp_path, make_model):
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    expected = model_fingerprint(model)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert next(loaded.parameters()).dtype == dtype
        assert model_fingerprint(loaded) == expected, dtype


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_float32_and_bfloat16_of_one_model_are_equal(family, make_model):
    model = make_model(family)
    assert model_fingerprint(model.to(torch.bfloat16)) == model_fingerprint(make_model(family))


def test_same_config_different_weights_differ(make_model):
    base = model_fingerprint(make_model("llama"))
    assert model_fingerprint(make_model("llama", seed=1)) != base
    edited = make_model("llama")
    with torch.no_grad():  # one projection of one middle layer, as a merged LoRA would change it
        edited.model.layers[2].self_attn.q_proj.weight.mul_(1.01)
    assert model_fingerprint(edited) != base


def test_configuration_that_changes_the_computation_counts(make_model):
    model = make_model("llama")
    base = model_fingerprint(model)
    assert model_fingerprint(make_model("llama", rope_theta=5000.0)) != base  # same weights, other RoPE
    assert model_fingerprint(make_model("llama", rms_norm_eps=1e-3)) != base
    with kvs.attach(model, backend="eager"):  # the attention implementation is not the model
        assert model_fingerprint(model) == base
    model.config.use_cache = not model.config.use_cache
    assert model_fingerprint(model) == base


def test_a_module_without_config():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    b = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert model_fingerprint(a) == model_fingerprint(a) != model_fingerprint(b)


def test_weight_samples_spread_over_the_tensor():
    big = torch.zeros(4 * SAMPLES_PER_TENSOR)
    assert len(weight_samples(big)) == 2 * SAMPLES_PER_TENSOR  # bfloat16: two bytes per sample
    assert len(weight_samples(torch.zeros(5))) == 10 and weight_samples(torch.zeros(0)) == b""
    edited = big.clone()
    edited[-1] = 1.0  # the last element is always sampled, as is the first
    assert weight_samples(edited) != weight_samples(big)
    assert weight_samples(big.to(torch.bfloat16)) == weight_samples(big)

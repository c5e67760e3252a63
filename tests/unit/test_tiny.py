"""The tiny offline tokenizer and models that the unit and contract tiers are built on behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from tests.tiny import (
    ASSISTANT,
    BOS,
    DEFAULT_ATTN_IMPLEMENTATION,
    EOS,
    FAMILIES,
    PAD,
    USER,
    tiny_model,
    tiny_tokenizer,
)

TEXTS = [
    "The harbour master walked to the market in the morning.",
    "Numbers 7294 and 1024, punctuation (a) [b] {c}; tabs\tand\nnewlines.",
    "  leading and trailing spaces  ",
    "Unseen words: zyxwvut qqq, kvsqueeze!",
    "Non-ASCII also works: café, Straße, 東京, 🙂",
    "",
]


# --- tokenizer --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 500
    assert tokenizer.pad_token == PAD
    assert tokenizer.bos_token == BOS
    assert tokenizer.eos_token == EOS
    assert tokenizer.padding_side == "left"
    for token in (PAD, BOS, EOS, USER, ASSISTANT):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, token
        assert tokenizer.decode(ids, skip_special_tokens=True) == ""
    # The tokenizer adds no BOS/EOS on its own.
    assert tokenizer("hello")["input_ids"] == tokenizer("hello", add_special_tokens=False)["input_ids"]


def test_tokenizer_pads_on_the_left(tokenizer):
    batch = tokenizer(["a long sentence about the harbour", "hi"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == tokenizer.pad_token_id
    assert batch["attention_mask"][1, 0].item() == 0
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]


def test_chat_template_renders(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is the code?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{BOS}Be brief.\n\n{USER}Hi there{EOS}{ASSISTANT}Hello.{EOS}{USER}What is the code?{EOS}{ASSISTANT}"
    )
    without_prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert without_prompt == f"{BOS}{USER}Hi there{EOS}"
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT)
    assert tokenizer.decode(ids) == f"{BOS}{USER}Hi there{EOS}{ASSISTANT}"


def test_tokenizer_without_template(tokenizer_no_template):
    assert tokenizer_no_template.chat_template is None
    with pytest.raises(ValueError):
        tokenizer_no_template.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_tokenizer_builds_are_independent_and_identical():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    assert first is not second
    assert first.get_vocab() == second.get_vocab()
    first.chat_template = None
    first.padding_side = "right"
    assert second.chat_template is not None
    assert second.padding_side == "left"
    assert tiny_tokenizer().chat_template is not None


# --- models -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_with_dynamic_cache(family, tokenizer):
    model = tiny_model(family)
    config = model.config
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert config.vocab_size == len(tokenizer)
    assert config.num_hidden_layers == 4
    assert config.num_key_value_heads == 2
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config._attn_implementation == DEFAULT_ATTN_IMPLEMENTATION[family]

    batch = tokenizer(
        ["The lighthouse keeper counted the boats after the storm.", "Hi there"], padding=True, return_tensors="pt"
    )
    cache = DynamicCache(config=config)
    with torch.no_grad():
        out = model(**batch, past_key_values=cache, use_cache=True)
        n = batch["input_ids"].shape[1]
        assert out.logits.shape == (2, n, len(tokenizer))
        assert torch.isfinite(out.logits).all()
        assert cache.get_seq_length() == n
        assert len(cache.layers) == 4
        # Full-attention layers keep every position: (batch, kv_heads, seq, head_dim).
        full = [
            i
            for i, t in enumerate(getattr(config, "layer_types", None) or ["full_attention"] * 4)
            if t == "full_attention"
        ]
        assert cache.layers[full[0]].keys.shape == (2, 2, n, 16)

        step = model(
            input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
            attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1),
            past_key_values=cache,
            use_cache=True,
        )
        assert step.logits.shape == (2, 1, len(tokenizer))
        assert cache.get_seq_length() == n + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_matches_full_forward(family, tokenizer):
    model = tiny_model(family)
    ids = tokenizer("The archivist opened the old map before dinner.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        last = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(last, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_not_uniform(family, tokenizer):
    model = tiny_model(family, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids = tokenizer(" ".join(["The captain visited the island during the festival."] * 8), return_tensors="pt")
    with torch.no_grad():
        attentions = model(**ids, output_attentions=True).attentions
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * 4
    for layer, probs in zip(layer_types, attentions, strict=True):
        if layer != "full_attention":
            continue
        last = probs[0, :, -1]  # (heads, keys)
        entropy = -(last.clamp_min(1e-12).log() * last).sum(-1)
        assert entropy.mean().item() < 0.85 * math.log(last.shape[-1]), family


def test_phi3_has_fused_qkv_and_partial_rotary():
    model = tiny_model("phi3")
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "qkv_proj")
    assert not hasattr(attn, "k_proj")
    assert attn.qkv_proj.out_features == (4 + 2 * 2) * 16
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_mixes_sliding_and_full_layers(family):
    model = tiny_model(family)
    assert model.config.sliding_window == 16
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    cache = DynamicCache(config=model.config)
    assert {type(layer).__name__ for layer in cache.layers} == {"DynamicSlidingWindowLayer", "DynamicLayer"}
    if family == "gemma2":
        assert model.config.attn_logit_softcapping is not None


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_other_families_are_full_attention_only(family):
    cache = DynamicCache(config=tiny_model(family).config)
    assert {type(layer).__name__ for layer in cache.layers} == {"DynamicLayer"}


def test_same_seed_gives_identical_weights():
    for family in FAMILIES:
        first, second = tiny_model(family, seed=3).state_dict(), tiny_model(family, seed=3).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), family
    other = tiny_model("llama", seed=4).state_dict()
    reference = tiny_model("llama", seed=3).state_dict()
    assert not torch.equal(
        other["model.layers.0.self_attn.q_proj.weight"], reference["model.layers.0.self_attn.q_proj.weight"]
    )


def test_config_overrides_apply():
    model = tiny_model("gemma3", num_hidden_layers=3, sliding_window=8)
    assert len(model.model.layers) == 3
    assert model.config.sliding_window == 8
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert tiny_model("llama", hidden_size=128, head_dim=32).config.head_dim == 32


def test_make_model_fixture(make_model):
    assert make_model is tiny_model


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="Unknown tiny model family"):
        tiny_model("gpt2")

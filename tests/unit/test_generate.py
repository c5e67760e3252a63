"""kvs.generate on tiny models: shapes of the output, measured stats, positions continuing from the uncompressed length,
batched contexts equal to contexts run alone, input validation, and transformers' own generate under compress."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.prompts import split_prompt
from tests.helpers import ids_of

CONTEXT = (
    "The harbour master walked to the market in the morning because it was raining. The old baker sold a box of "
    "apples after the storm. The lighthouse keeper counted the boats at night and nobody knows why."
)
OTHER = "A young sailor painted a wooden boat last winter. The mayor visited the museum on Sunday."
QUESTIONS = ["Who sold apples?", "When did the keeper count the boats?"]
MAX_NEW = 6


def context_tokens(tokenizer, context: str, question: str = "q") -> int:
    head, _ = split_prompt(tokenizer, context, question)
    special = getattr(tokenizer, "chat_template", None) is None
    return len(tokenizer(head, add_special_tokens=special)["input_ids"])


def greedy_reference(model, tokenizer, context: str, question: str, max_new: int = MAX_NEW) -> str:
    """transformers' own greedy generate on the whole prompt (no kvsqueeze), decoded as kvs.generate decodes."""
    head, tail = split_prompt(tokenizer, context, question)
    special = getattr(tokenizer, "chat_template", None) is None
    ids = (
        tokenizer(head, add_special_tokens=special)["input_ids"]
        + tokenizer(tail, add_special_tokens=False)["input_ids"]
    )
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new, do_sample=False, pad_token_id=0
    )
    new = [t for t in out[0, prompt.shape[1] :].tolist() if t != tokenizer.eos_token_id]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


# --- output and stats -------------------------------------------------------------------------------------------------


def test_generate_output_and_stats(make_model, tokenizer):
    model = make_model("llama")
    out = kvs.generate(
        model, tokenizer, CONTEXT, QUESTIONS, method=kvs.get_method("knorm", ratio=0.5), max_new_tokens=MAX_NEW
    )
    assert isinstance(out.answers, list) and len(out.answers) == len(QUESTIONS)
    assert all(isinstance(a, str) for a in out.answers)
    n = context_tokens(tokenizer, CONTEXT)
    stats = out.stats
    assert stats.tokens_before == n
    assert stats.tokens_after == math.floor(n * 0.5)
    assert stats.kept_tokens_per_layer == [math.floor(n * 0.5)] * 4
    assert stats.kv_bytes_before == 4 * n * 256  # 4 layers, 2 KV heads x 16 dims x fp32 x (K, V) = 256 bytes a token
    assert stats.kv_bytes_after == 4 * math.floor(n * 0.5) * 256 < stats.kv_bytes_before
    assert stats.kv_bytes_after == kvs.cache_stats(out.cache).kv_bytes
    assert stats.padding_bytes == 0 and stats.sliding_kv_bytes == 0
    assert stats.kv_bytes_after < stats.peak_kv_bytes < stats.kv_bytes_before
    assert stats.prefill_seconds > 0 and 0 <= stats.compression_seconds <= stats.prefill_seconds
    assert stats.decode_tokens_per_second > 0
    assert set(stats.to_dict()) >= {"tokens_before", "kv_bytes_before", "kv_bytes_after", "peak_kv_bytes"}
    # the returned cache is the compressed context, untouched by the questions
    assert out.cache.real_tokens_seen().tolist() == [n]
    assert [int(layer.kept.max()) for layer in out.cache.full_layers()] == [math.floor(n * 0.5)] * 4


def test_uncompressed_generate_equals_transformers_greedy(make_model, tokenizer):
    model = make_model("qwen2")
    out = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=MAX_NEW)
    assert out.answers == [greedy_reference(model, tokenizer, CONTEXT, q) for q in QUESTIONS]
    assert out.answers[0] != out.answers[1] or out.answers[0], "degenerate answers would make this test vacuous"
    assert out.stats.kv_bytes_after == out.stats.kv_bytes_before


def test_questions_continue_from_the_uncompressed_length(make_model, tokenizer):
    model = make_model("llama")
    calls: list[torch.Tensor] = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        out = kvs.generate(
            model,
            tokenizer,
            CONTEXT,
            QUESTIONS[:1],
            method=kvs.get_method("streaming_llm", ratio=0.75),
            max_new_tokens=3,
        )
    finally:
        handle.remove()
    n = context_tokens(tokenizer, CONTEXT)
    q = len(tokenizer(split_prompt(tokenizer, CONTEXT, QUESTIONS[0])[1], add_special_tokens=False)["input_ids"])
    assert out.cache.real_tokens_seen().tolist() == [n]
    assert calls[0].tolist() == [list(range(n))]
    assert calls[1].tolist() == [list(range(n, n + q))]  # not from the 25% that are kept
    assert [c.tolist() for c in calls[2:]] == [[[n + q + i]] for i in range(len(calls) - 2)]


@pytest.mark.parametrize("method", [None, "knorm"])
def test_several_contexts_give_nested_answers_equal_to_each_alone(method, make_model, tokenizer):
    model = make_model("llama")
    build = (lambda: kvs.get_method(method, ratio=0.5)) if method else (lambda: None)
    questions = [QUESTIONS, ["Who painted the boat?"]]
    out = kvs.generate(model, tokenizer, [CONTEXT, OTHER], questions, method=build(), max_new_tokens=MAX_NEW)
    assert [len(a) for a in out.answers] == [2, 1]
    alone = [
        kvs.generate(model, tokenizer, c, q, method=build(), max_new_tokens=MAX_NEW).answers
        for c, q in zip([CONTEXT, OTHER], questions, strict=True)
    ]
    assert out.answers == alone
    lengths = [context_tokens(tokenizer, CONTEXT), context_tokens(tokenizer, OTHER)]
    assert out.stats.tokens_before == sum(lengths)
    assert out.cache.real_tokens_seen().tolist() == lengths
    if method:
        for layer in out.cache.full_layers():
            assert layer.kept.tolist() == [[n // 2] * 2 for n in lengths]
        assert out.stats.padding_bytes == 0  # the shorter context is stored ragged: no empty slots


def test_questions_of_different_lengths_on_sliding_layers(make_model, tokenizer):
    """Shorter questions are left-padded after the context: their sliding windows must still hold real tokens."""
    model = make_model("gemma3")
    contexts = [
        "The harbour master walked to the market in the morning because it was raining. The old baker sold a box "
        "of apples.",
        "A young sailor painted a wooden boat last winter. The mayor visited the museum on Sunday.",
    ]
    questions = [
        "Who?",
        "When?",
        "Where did the ship go after the storm and why was the bridge closed during the festival?",
    ]
    for context in contexts:
        together = kvs.generate(model, tokenizer, context, questions, max_new_tokens=8).answers
        alone = [kvs.generate(model, tokenizer, context, [q], max_new_tokens=8).answers[0] for q in questions]
        assert together == alone


def test_chunked_prefill(make_model, tokenizer):
    model = make_model("llama")
    one_shot = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=MAX_NEW)
    chunked = kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=MAX_NEW, chunk_size=7)
    assert chunked.answers == one_shot.answers
    compressed = kvs.generate(
        model, tokenizer, CONTEXT, QUESTIONS, method=kvs.get_method("knorm", ratio=0.5), chunk_size=16
    )
    n = context_tokens(tokenizer, CONTEXT)
    assert compressed.stats.kept_tokens_per_layer == [n // 2] * 4
    assert compressed.stats.peak_kv_bytes <= (4 * (n // 2) + 16) * 256
    with pytest.raises(ValueError, match="chunk_size"):
        kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, chunk_size=0)


def test_tokenizer_without_chat_template(make_model, tokenizer_no_template, caplog):
    model = make_model("llama")
    with caplog.at_level(logging.WARNING, logger="kvsqueeze"):
        out = kvs.generate(model, tokenizer_no_template, CONTEXT, QUESTIONS, max_new_tokens=MAX_NEW)
    assert "chat template" in caplog.text
    assert len(out.answers) == 2 and all(isinstance(a, str) for a in out.answers)
    head, tail = split_prompt(tokenizer_no_template, CONTEXT, QUESTIONS[0], answer_prefix="It was")
    assert head == CONTEXT + "\n\n" and tail == f"Question: {QUESTIONS[0]}\nAnswer: It was"
    assert out.stats.tokens_before == len(tokenizer_no_template(head)["input_ids"])
    assert out.answers == [greedy_reference(model, tokenizer_no_template, CONTEXT, q) for q in QUESTIONS]


def test_answer_prefix_goes_after_the_template(tokenizer):
    head, tail = split_prompt(tokenizer, CONTEXT, "Who?", answer_prefix="The answer is")
    assert head.startswith("<|bos|><|user|>" + CONTEXT)
    assert tail == "Who?<|eos|><|assistant|>The answer is"


# --- validation -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("context", ["", "   \n"])
def test_empty_context_raises(context, make_model, tokenizer):
    with pytest.raises(ValueError, match="context 0 is empty"):
        kvs.generate(make_model("llama"), tokenizer, context, QUESTIONS)


def test_bad_arguments_raise(make_model, tokenizer):
    model = make_model("llama")
    with pytest.raises(ValueError, match="no context"):
        kvs.generate(model, tokenizer, [], [])
    with pytest.raises(ValueError, match="one per context"):
        kvs.generate(model, tokenizer, [CONTEXT, OTHER], QUESTIONS)
    with pytest.raises(ValueError, match="context 1 has no question"):
        kvs.generate(model, tokenizer, [CONTEXT, OTHER], [QUESTIONS, []])
    with pytest.raises(ValueError, match="context 1 is empty"):
        kvs.generate(model, tokenizer, [CONTEXT, ""], [QUESTIONS, QUESTIONS])
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvs.generate(model, tokenizer, CONTEXT, QUESTIONS, max_new_tokens=0)


def test_context_too_long_raises_with_the_numbers(make_model, tokenizer):
    model = make_model("llama")
    long_context = " ".join(["The captain visited the island during the festival."] * 120)
    n = context_tokens(tokenizer, long_context)
    assert n > 1024
    with pytest.raises(ValueError, match=rf"context 0 has {n} tokens.*maximum of 1024"):
        kvs.generate(model, tokenizer, long_context, QUESTIONS, max_new_tokens=4)
    # just under the limit once the question and the new tokens are counted
    fitting = " ".join(["The captain visited the island during the festival."] * 55)
    q = len(tokenizer(split_prompt(tokenizer, fitting, QUESTIONS[1])[1], add_special_tokens=False)["input_ids"])
    room = 1024 - context_tokens(tokenizer, fitting) - q
    assert room > 1
    with pytest.raises(ValueError, match=rf"max_new_tokens \({room + 1}\).*1025 positions"):
        kvs.generate(model, tokenizer, fitting, QUESTIONS, max_new_tokens=room + 1)


# --- transformers' generate under compress ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_model_generate_under_compress(family, make_model):
    model = make_model(family)
    ids = ids_of(40, batch=2)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :9] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(ids, **kwargs)
    with kvs.compress(model, kvs.get_method("knorm", ratio=0.0)):
        got = model.generate(ids, past_key_values=kvs.KVCache(model.config), **kwargs)
    assert torch.equal(got, expected)
    cache = kvs.KVCache(model.config)
    with kvs.compress(model, kvs.get_method("streaming_llm", ratio=0.5)):
        model.generate(ids, past_key_values=cache, **kwargs)
    # re-compressed at every decoding step: half of all the tokens seen (40 + 7 fed back), per row
    assert cache.real_tokens_seen().tolist() == [47, 38]
    for layer in cache.full_layers():
        assert layer.kept.tolist() == [[23, 23], [19, 19]]


def test_model_generate_under_compress_needs_a_kvcache(make_model):
    model = make_model("llama")
    ids = ids_of(10)
    needs_kvcache = pytest.raises(TypeError, match=r"past_key_values=kvsqueeze\.KVCache\(model\.config\)")
    with needs_kvcache, kvs.compress(model, kvs.get_method("knorm", ratio=0.5)):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks, "hooks are removed even when generation fails"

"""Conversation, save/load and decoding-time compression on the embedded SmolLM2-135M-Instruct (slow tier)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import kvsqueeze as kvs
from kvsqueeze.prompts import split_prompt

pytestmark = pytest.mark.slow

FILLER = (
    "The market square filled slowly as the bakers opened their shutters. Fishermen argued about the weather "
    "while children chased pigeons between the stalls. "
)
CONTEXT = FILLER * 3 + "The secret number of the lighthouse keeper is 5831. " + FILLER * 3


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any]:
    return kvs.load_model()


def test_conversation_turns_equal_the_rendered_conversation(smol: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = smol
    conv = kvs.Conversation(model, tokenizer, CONTEXT, method=kvs.get_method("knorm", ratio=0.5), budget=160, every=16)
    first = conv.ask("What is the secret number of the lighthouse keeper?", max_new_tokens=24)
    path = conv.save(tmp_path / "conv.safetensors")
    second = conv.ask("Who argued about the weather?", max_new_tokens=24)
    assert first and second
    rendered = tokenizer.apply_chat_template(conv.messages, tokenize=False)
    assert conv.text == rendered
    assert conv.exact, "SmolLM2's greedy tokens are the tokenization of their own text"
    # the one documented split: the document (compressed before any question) ends at the "\n\n" before the first
    # question, where a tokenizer may merge whitespace differently; everything after it is tokenized as a whole
    head = split_prompt(tokenizer, CONTEXT, "")[0]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert conv.ids == encode(head) + encode(rendered[len(head) :])
    assert conv.cache.real_tokens_seen().tolist() == [len(conv.ids)]
    assert all(int(layer.kept.max()) < 160 + 16 for layer in conv.cache.full_layers())
    loaded = kvs.Conversation.load(path, model, tokenizer, method=kvs.get_method("knorm"))
    assert loaded.ask("Who argued about the weather?", max_new_tokens=24) == second


def test_generate_with_a_large_decode_target_changes_nothing(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    question = ["Describe the market square in detail."]
    method = kvs.get_method("snapkv", ratio=0.5, window=16)
    plain = kvs.generate(model, tokenizer, CONTEXT, question, method=method, max_new_tokens=48)
    same = kvs.generate(model, tokenizer, CONTEXT, question, method=method, max_new_tokens=48, decode_target=4096)
    assert same.answers == plain.answers
    small = kvs.generate(model, tokenizer, CONTEXT, question, method=method, max_new_tokens=48, decode_target=64,
                         decode_every=8)  # fmt: skip
    assert isinstance(small.answers[0], str) and small.answers[0]

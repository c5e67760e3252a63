"""Conversation: turns appended through the chat template equal the whole rendered conversation, positions stay
absolute, the budget holds, answers equal uncompressed generation when nothing is evicted, and save/load works."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs

CONTEXT = (
    "The harbour master walked to the market in the morning because it was raining. The old baker sold a box of "
    "apples after the storm. The lighthouse keeper counted the boats at night and nobody knows why."
)
TURNS = [("Who sold apples?", "The old baker."), ("Where did he walk?", " To the market!"), ("Why?", "Rain.\n")]


def rendered_ids(tokenizer, messages, generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_turns_equal_the_whole_rendered_conversation(make_model, tokenizer):
    model = make_model("llama")
    conv = kvs.Conversation(model, tokenizer, CONTEXT, method=kvs.get_method("knorm", ratio=0.5), budget=30)
    for question, reply in TURNS:
        assert conv.ask(question, answer=reply) == reply.strip()
        assert conv.ids == rendered_ids(tokenizer, conv.messages)
        assert conv.text == tokenizer.apply_chat_template(conv.messages, tokenize=False)
        assert conv.cache.real_tokens_seen().tolist() == [conv.seen]
        for layer in conv.cache.full_layers():  # every forward was several tokens: compressed to the budget at once
            assert layer.kept.tolist() == [[30, 30]]
            assert int(layer.positions.max()) <= conv.seen - 1 and int(layer.positions.min()) >= 0
    assert conv.exact
    assert conv.messages[0]["content"] == f"{CONTEXT}\n\n{TURNS[0][0]}"
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3


def test_positions_continue_across_turns(make_model, tokenizer):
    model = make_model("llama")
    calls: list[list[int]] = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["position_ids"][0].tolist()), with_kwargs=True
    )
    try:
        conv = kvs.Conversation(model, tokenizer, CONTEXT, method=kvs.get_method("streaming_llm", ratio=0.5),
                                budget=24, every=4)  # fmt: skip
        conv.ask("Who sold apples?", max_new_tokens=6)
        conv.ask("Why?", max_new_tokens=6)
    finally:
        handle.remove()
    assert [p for call in calls for p in call] == list(range(conv.seen))  # every token at its absolute position
    assert len(calls) > 4
    assert conv.cache.real_tokens_seen().tolist() == [conv.seen] and conv.seen == len(conv.ids)
    for layer in conv.cache.full_layers():
        assert 24 <= int(layer.kept.max()) < 24 + 4


def test_uncompressed_answers_equal_greedy_generation_on_the_whole_prompt(make_model, tokenizer):
    model = make_model("qwen2")
    conv = kvs.Conversation(model, tokenizer, CONTEXT)
    conv.ask(TURNS[0][0], answer=TURNS[0][1])
    got = conv.ask("Where did he walk?", max_new_tokens=8)
    messages = conv.messages[:-1]
    prompt = torch.tensor([rendered_ids(tokenizer, messages, generation_prompt=True)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    new = [t for t in out[0, prompt.shape[1] :].tolist() if t != tokenizer.eos_token_id]
    assert got == tokenizer.decode(new, skip_special_tokens=True).strip()
    assert got  # a non-empty answer, so the comparison means something


def test_save_and_load_continue_identically(make_model, tokenizer, tmp_path):
    model = make_model("llama")
    knorm = kvs.get_method("knorm", ratio=0.5)
    conv = kvs.Conversation(model, tokenizer, CONTEXT, method=knorm, budget=28, every=4)
    conv.ask("Who sold apples?", max_new_tokens=5)
    path = conv.save(tmp_path / "conv.safetensors")
    loaded = kvs.Conversation.load(path, model, tokenizer, method=knorm)
    assert loaded.messages == conv.messages and loaded.ids == conv.ids and loaded.text == conv.text
    assert loaded.ask("Why?", max_new_tokens=8) == conv.ask("Why?", max_new_tokens=8)
    assert loaded.ids == conv.ids
    with pytest.raises(ValueError, match="fingerprint"):
        kvs.Conversation.load(path, make_model("llama", seed=3), tokenizer)
    plain = kvs.save_cache(tmp_path / "plain.safetensors", conv.cache, model)
    with pytest.raises(ValueError, match="no conversation"):
        kvs.Conversation.load(plain, model, tokenizer)


def test_bad_arguments_raise(make_model, tokenizer, tokenizer_no_template):
    model = make_model("llama")
    with pytest.raises(ValueError, match="chat template"):
        kvs.Conversation(model, tokenizer_no_template, CONTEXT)
    with pytest.raises(ValueError, match="context is empty"):
        kvs.Conversation(model, tokenizer, "  ")
    with pytest.raises(ValueError, match="budget must be an integer >= 1"):
        kvs.Conversation(model, tokenizer, CONTEXT, budget=0)
    conv = kvs.Conversation(model, tokenizer, CONTEXT)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        conv.ask("q", max_new_tokens=0)

"""The OpenAI routes through the official `openai` client: models, chat and completions, streaming or not, usage,
sampling, and the answers `kvsqueeze.generate` gives on the same inputs."""

from __future__ import annotations

from typing import Any

import kvsqueeze as kvs
from kvsqueeze.generation import encode
from kvsqueeze.prompts import split_prompt
from tests.serve.live import DOC_A, DOC_B, QUESTIONS, Live
from tests.tiny import training_corpus

KNORM = {"method": "knorm", "ratio": 0.5}


def test_models_and_health(server: Live) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model_name]
    assert server.get("/health").json() == {"status": "ok"}


def test_requests_are_counted_by_route_and_status(server: Live) -> None:
    before = server.metrics()
    server.client().models.list()
    server.get("/v1/contexts/ctx-" + "0" * 32)
    after = server.metrics()
    for key in ("kvsqueeze_requests_total{route=/v1/models,status=200}",
                "kvsqueeze_requests_total{route=/v1/contexts/{id},status=404}"):  # fmt: skip
        assert after[key] == before.get(key, 0) + 1, key


def test_chat_over_a_context_equals_generate(server: Live, reference: tuple[Any, Any]) -> None:
    context = server.post("/v1/contexts", {"text": DOC_A, "kv_compression": KNORM}).json()
    model, tokenizer = reference
    for question in QUESTIONS:
        reply = server.chat(question, max_tokens=12, extra_body={"context_id": context["id"]})
        expected = kvs.generate(model, tokenizer, DOC_A, question, method=kvs.get_method("knorm", ratio=0.5),
                                max_new_tokens=12)  # fmt: skip
        assert reply.choices[0].message.content.strip() == expected.answers[0]
        assert reply.choices[0].finish_reason == expected.finish_reasons[0]
        head, tail = split_prompt(tokenizer, DOC_A, question)
        assert reply.usage.prompt_tokens == len(encode(tokenizer, head)) + len(encode(tokenizer, tail))
        assert reply.usage.prompt_tokens == context["tokens"] + len(encode(tokenizer, tail))
        length = reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 12 if length else 1 <= reply.usage.completion_tokens <= 12
        assert reply.model_extra["kvsqueeze"]["context_id"] == context["id"]


def test_a_repeated_document_is_a_cache_hit_with_the_same_answer(server: Live) -> None:
    document = " ".join(training_corpus(400)[60:66])  # a document no other test sends
    before = server.metrics()
    first = server.chat(QUESTIONS[0], system=document)
    middle = server.metrics()
    second = server.chat(QUESTIONS[0], system=document)
    after = server.metrics()
    assert middle["kvsqueeze_prefills_total"] == before["kvsqueeze_prefills_total"] + 1
    assert after["kvsqueeze_prefills_total"] == middle["kvsqueeze_prefills_total"]  # no second prefill
    hits = "kvsqueeze_context_cache_hits_total{where=memory}"
    assert after[hits] == middle[hits] + 1
    assert second.choices[0].message.content == first.choices[0].message.content
    assert first.model_extra["kvsqueeze"]["context_cache"] == "miss"
    assert second.model_extra["kvsqueeze"] == {**first.model_extra["kvsqueeze"], "context_cache": "memory"}
    # another question over the same document reuses it too
    third = server.chat(QUESTIONS[1], system=document)
    assert third.model_extra["kvsqueeze"]["context_cache"] == "memory"


def test_chat_stream_joins_to_the_answer(server: Live) -> None:
    whole = server.chat(QUESTIONS[1], system=DOC_B, max_tokens=10)
    chunks = list(server.chat(QUESTIONS[1], system=DOC_B, max_tokens=10, stream=True,
                              stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_ends_with_done(server: Live) -> None:
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3,
            "temperature": 0, "stream": True}  # fmt: skip
    response = server.post("/v1/chat/completions", body, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events[-2] != "data: [DONE]"


def test_completions_split_after_the_last_blank_line_like_generate_without_template(
    server: Live, reference: tuple[Any, Any]
) -> None:
    model, tokenizer = reference
    prompt = f"{DOC_B}\n\nQuestion: {QUESTIONS[0]}\nAnswer:"
    client = server.client()
    kwargs: dict[str, Any] = {"model": server.model_name, "prompt": prompt, "max_tokens": 9, "temperature": 0}
    whole = client.completions.create(**kwargs)
    expected = kvs.generate(model, tokenizer, DOC_B, QUESTIONS[0], method=kvs.get_method("knorm", ratio=0.5),
                            max_new_tokens=9, chat_template=False)  # fmt: skip
    assert whole.choices[0].text.strip() == expected.answers[0]
    assert whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(encode(tokenizer, prompt))  # the split falls between two tokens
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_over_a_context_continues_its_text(server: Live) -> None:
    context = server.post("/v1/contexts", {"text": DOC_B}).json()
    client = server.client()
    reply = client.completions.create(model=server.model_name, prompt="The harbour", max_tokens=5, temperature=0,
                                      extra_body={"context_id": context["id"]})  # fmt: skip
    assert reply.model_extra["kvsqueeze"] == {"context_id": context["id"], "context_cache": "memory"}
    assert reply.usage.prompt_tokens == context["tokens"] + len(encode(server.tokenizer, "The harbour"))


def test_stop_strings_cut_the_answer(server: Live) -> None:
    free = server.chat(QUESTIONS[0], system=DOC_A, max_tokens=16).choices[0].message.content
    stop = free[4:6]
    cut = server.chat(QUESTIONS[0], system=DOC_A, max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == free[: free.index(stop)]
    assert cut.finish_reason == "stop"


def test_sampling_with_a_seed_repeats(server: Live) -> None:
    replies = [server.chat(QUESTIONS[0], system=DOC_A, temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
               for _ in range(2)]  # fmt: skip
    greedy = server.chat(QUESTIONS[0], system=DOC_A, max_tokens=8)
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].choices[0].message.content != greedy.choices[0].message.content


def test_extreme_sampling_values_are_the_most_likely_token(server: Live) -> None:
    greedy = server.chat(QUESTIONS[1], system=DOC_A, max_tokens=6).choices[0].message.content
    for extreme in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300, "seed": 3}):
        assert server.chat(QUESTIONS[1], system=DOC_A, max_tokens=6, **extreme).choices[0].message.content == greedy


def test_compression_chosen_per_request(server: Live) -> None:
    sizes = {}
    for method in ("none", "knorm", "snapkv"):
        body = {"text": DOC_A, "kv_compression": {"method": method, "ratio": 0.5}}
        context = server.post("/v1/contexts", body).json()
        sizes[method] = (context["kv_bytes_before"], context["kv_bytes_after"], context["id"])
    before, after, _ = sizes["none"]
    assert after == before
    assert sizes["knorm"][1] <= 0.55 * before and sizes["snapkv"][1] <= 0.55 * before
    assert len({sizes[m][2] for m in sizes}) == 3  # one context per compression setting
    reply = server.chat(
        QUESTIONS[0], system=DOC_A, extra_body={"kv_compression": {"method": "snapkv", "options": {"window": 4}}}
    )
    assert reply.choices[0].message.content

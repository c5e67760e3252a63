"""`/v1/contexts`: upload a document once, read what it holds, answer over it by id, delete it."""

from __future__ import annotations

import openai
import pytest

from tests.serve.live import QUESTIONS, Live
from tests.tiny import training_corpus

DOC = " ".join(training_corpus(400)[80:88])  # this module's own document


def test_create_read_reuse_delete(server: Live) -> None:
    created = server.post("/v1/contexts", {"text": DOC, "kv_compression": {"method": "knorm", "ratio": 0.75}})
    assert created.status_code == 200
    context = created.json()
    assert context["id"].startswith("ctx-") and context["object"] == "kvsqueeze.context"
    assert context["found"] == "miss" and context["held_in_memory"] is True
    assert context["kind"] == "document" and "document" not in context  # the text is not echoed back
    assert context["compression"] == {"method": "knorm", "ratio": 0.75, "options": {}, "budget_policy": None,
                                      "kv_bits": None}  # fmt: skip
    assert context["tokens"] > 100
    assert 0.2 * context["kv_bytes_before"] <= context["kv_bytes_after"] <= 0.3 * context["kv_bytes_before"]

    again = server.post("/v1/contexts", {"text": DOC, "kv_compression": {"method": "knorm", "ratio": 0.75}}).json()
    assert again["id"] == context["id"] and again["found"] == "memory"  # the same document: the same context

    read = server.get(f"/v1/contexts/{context['id']}").json()
    assert {k: read[k] for k in ("id", "tokens", "kv_bytes_after")} == {
        k: context[k] for k in read if k in ("id", "tokens", "kv_bytes_after")
    }
    reply = server.chat(QUESTIONS[0], extra_body={"context_id": context["id"]})
    assert reply.model_extra["kvsqueeze"] == {"context_id": context["id"], "context_cache": "memory"}

    deleted = server.delete(f"/v1/contexts/{context['id']}")
    assert deleted.json() == {"id": context["id"], "object": "kvsqueeze.context.deleted", "deleted": True}
    assert server.get(f"/v1/contexts/{context['id']}").status_code == 404
    assert server.delete(f"/v1/contexts/{context['id']}").status_code == 404
    with pytest.raises(openai.NotFoundError) as err:
        server.chat(QUESTIONS[0], extra_body={"context_id": context["id"]})
    assert err.value.body["code"] == "context_not_found" and context["id"] in err.value.body["message"]


def test_a_context_quantized_to_kv_bits_holds_fewer_bytes_and_answers(server: Live) -> None:
    full = server.post("/v1/contexts", {"text": DOC, "kv_compression": {"method": "knorm", "ratio": 0.5}}).json()
    quantized = server.post(
        "/v1/contexts", {"text": DOC, "kv_compression": {"method": "knorm", "ratio": 0.5, "kv_bits": 4}}
    ).json()
    assert quantized["id"] != full["id"] and quantized["compression"]["kv_bits"] == 4
    assert quantized["kv_bytes_after"] < 0.6 * full["kv_bytes_after"]  # 4-bit codes, scales and a residual window
    reply = server.chat(QUESTIONS[0], extra_body={"context_id": quantized["id"]})
    assert reply.choices[0].message.content and reply.model_extra["kvsqueeze"]["context_cache"] == "memory"
    bad = server.post("/v1/contexts", {"text": DOC, "kv_compression": {"kv_bits": 3}})
    assert bad.status_code == 400 and "kv_bits" in bad.json()["error"]["message"]


def test_unknown_and_malformed_ids_are_404(server: Live) -> None:
    for cid in ("ctx-" + "0" * 32, "..%2F..%2Fetc%2Fpasswd", "nothing", "..%2Fnothing"):
        response = server.get(f"/v1/contexts/{cid}")
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"


def test_context_id_refuses_its_own_compression(server: Live) -> None:
    cid = server.post("/v1/contexts", {"text": DOC}).json()["id"]
    with pytest.raises(openai.BadRequestError) as err:
        server.chat(QUESTIONS[0], extra_body={"context_id": cid, "kv_compression": {"method": "snapkv"}})
    assert err.value.body["param"] == "kv_compression" and "compressed when it was created" in str(err.value)


def test_a_system_message_cannot_precede_a_context(server: Live) -> None:
    cid = server.post("/v1/contexts", {"text": DOC}).json()["id"]
    with pytest.raises(openai.BadRequestError) as err:
        server.chat(QUESTIONS[0], system="Be brief.", extra_body={"context_id": cid})
    assert "opens the chat" in str(err.value)


def test_multi_turn_over_a_context(server: Live) -> None:
    cid = server.post("/v1/contexts", {"text": DOC}).json()["id"]
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "To the island."},
                {"role": "user", "content": QUESTIONS[1]}]  # fmt: skip
    reply = server.client().chat.completions.create(model=server.model_name, messages=messages, max_tokens=4,
                                                    temperature=0, extra_body={"context_id": cid})  # fmt: skip
    assert reply.model_extra["kvsqueeze"]["context_id"] == cid
    assert reply.usage.completion_tokens >= 1


def test_the_id_of_an_automatic_prefix_is_readable_not_nameable(server: Live) -> None:
    reply = server.chat(QUESTIONS[0], system=DOC)
    cid = reply.model_extra["kvsqueeze"]["context_id"]
    info = server.get(f"/v1/contexts/{cid}").json()
    assert info["kind"] == "prefix" and 0 < info["tokens"] < reply.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        server.chat(QUESTIONS[1], extra_body={"context_id": cid})
    assert "cached prefix of earlier messages" in str(err.value)

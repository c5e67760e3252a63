"""Every mistake a client can make is answered in OpenAI's error shape with a 4xx status and a message that says what
to change; never a 500, never a stack trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.serve.live import DOC_A, QUESTIONS, Live, live_server


def chat_body(live: Live, **fields: Any) -> dict[str, Any]:
    return {"model": live.model_name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **fields}


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return dict(body["error"])


def test_unknown_method_and_option_get_the_registry_message(server: Live) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        server.chat(QUESTIONS[0], system=DOC_A, extra_body={"kv_compression": {"method": "snapkvv"}})
    assert "Unknown method 'snapkvv'. Did you mean 'snapkv'" in err.value.body["message"]
    assert err.value.status_code == 400 and err.value.body["param"] == "kv_compression"
    error = error_of(server.post("/v1/chat/completions", chat_body(server, kv_compression={
        "method": "snapkv", "options": {"windw": 8}})), 400)  # fmt: skip
    assert "Unknown option 'windw'" in error["message"] and "Did you mean 'window'" in error["message"]
    error = error_of(server.post("/v1/contexts", {"text": DOC_A, "kv_compression": {"ratio": 1.5}}), 400)
    assert "ratio must be" in error["message"] and "1.5" in error["message"]
    error = error_of(server.post("/v1/contexts", {"text": DOC_A, "kv_compression": {"method": "finch"}}), 400)
    assert "query-aware" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"n": 2}, "n", "n=2 is not supported"),
        ({"max_tokens": 100_000}, "max_tokens", "[1, 512]"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "[1, 512]"),
        ({"temperature": -1}, "temperature", "temperature must be"),
        ({"top_p": 0}, "top_p", "top_p must be"),
        ({"seed": -5}, "seed", "seed must be"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"logprobs": True}, "logprobs", "not supported"),
        ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, None, "last message must be a user message"),
        ({"messages": []}, None, "messages is empty"),
    ],
)
def test_bad_values_are_400_naming_them(server: Live, fields: dict[str, Any], param: str | None, words: str) -> None:
    error = error_of(server.post("/v1/chat/completions", chat_body(server, **fields)), 400)
    assert words in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model"),  # no model
        ({"model": "m", "messages": [{"role": "robot", "content": "Hi"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content.str"),
        ({"model": "m", "messages": "Hi"}, "messages"),
        ({"model": "m", "messages": [], "temprature": 0.5}, "temprature"),  # a misspelled field
        ({"model": "m", "messages": [], "kv_compression": {"methd": "knorm"}}, "kv_compression.methd"),
        ([1, 2, 3], None),
    ],
)
def test_bodies_off_the_schema_are_422(server: Live, body: Any, param: str | None) -> None:
    error = error_of(server.post("/v1/chat/completions", body), 422)
    assert error["param"] == param and error["code"] == "invalid_request"


def test_invalid_json_is_422(server: Live) -> None:
    response = server.post("/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in error_of(response, 422)["message"]


def test_unknown_model_route_and_method_are_404_405(server: Live) -> None:
    assert error_of(server.post("/v1/chat/completions", chat_body(server, model="gpt-4")), 404)["code"] == (
        "model_not_found")  # fmt: skip
    assert "no route" in error_of(server.get("/v1/nothing"), 404)["message"]
    error_of(server.get("/v1/chat/completions"), 405)


def test_too_long_prompt_and_body(server: Live) -> None:
    long = " ".join([DOC_A] * 4)  # about 1200 tokens: over --max-prompt-tokens 1000
    error = error_of(server.post("/v1/chat/completions", chat_body(server, messages=[
        {"role": "system", "content": long}, {"role": "user", "content": "Hi"}])), 400)  # fmt: skip
    assert error["code"] == "context_length_exceeded" and "at most 1000" in error["message"]
    error = error_of(server.post("/v1/chat/completions", chat_body(server, max_tokens=500, messages=[
        {"role": "system", "content": DOC_A * 2}, {"role": "user", "content": "Hi"}])), 400)  # fmt: skip
    assert "more than the model's maximum of 1024" in error["message"]
    error = error_of(server.post("/v1/contexts", {"text": long}), 400)
    assert error["code"] == "context_length_exceeded" and "the document has" in error["message"]
    huge = {"text": "x " * 150_000}  # over --max-body-bytes 200000
    assert "larger than this server's limit" in error_of(server.post("/v1/contexts", huge), 413)["message"]
    chunked = server.post("/v1/contexts", data=iter([b'{"text": "', b"y" * 250_000, b'"}']),
                          headers={"content-type": "application/json"})  # fmt: skip
    error_of(chunked, 413)  # no Content-Length: refused once the bytes received pass the limit


def test_api_key(model_dir: Path) -> None:
    with live_server(model_dir, api_key="s3cret") as live:
        assert live.get("/health").status_code == 200  # open, for probes
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = error_of(live.post("/v1/chat/completions", chat_body(live), headers=headers), 401)
            assert error["type"] == "authentication_error"
        error_of(live.get("/metrics", headers={"Authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.list()
        assert live.client().models.list().data[0].id == live.model_name  # the right key
        assert live.chat("Hello", max_tokens=2).choices[0].message.content is not None


def test_a_request_failing_in_the_model_thread_leaves_the_server_and_its_cache_intact(server: Live) -> None:
    before = server.chat(QUESTIONS[0], system=DOC_A, max_tokens=6).choices[0].message.content
    # SnapKV's window of 64 tokens cannot fit in half of this short prompt: the method refuses while prefilling
    error = error_of(server.post("/v1/contexts", {"text": "Short.", "kv_compression": {"method": "snapkv"}}), 400)
    assert "snapkv" in error["message"].lower() and "budget" in error["message"]
    assert server.get("/health").json() == {"status": "ok"}
    assert server.chat(QUESTIONS[0], system=DOC_A, max_tokens=6).choices[0].message.content == before

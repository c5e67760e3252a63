"""Property-based fuzzing: every route of the server's own OpenAPI schema (schemathesis), with bodies that fit the
schema and bodies that do not, half of them with the served model's name (so they reach the model); then chat bodies
built to reach the model, with extreme sampling values (NaN and Infinity included, as Python's JSON writes them) and
any registered method. Whatever comes in, the answer is never a 5xx, and every error is in OpenAI's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from kvsqueeze.methods import list_methods
from tests.serve.live import DOC_A, live_server


def test_no_input_gets_a_server_error(model_dir: Path) -> None:
    limits = {"max_tokens_limit": 4, "max_prompt_tokens": 600, "max_body_bytes": 20_000}
    with live_server(model_dir, **limits) as live:
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        cases = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
        seen: dict[int, int] = {}

        @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=cases, served=st.booleans())
        def check(case: Any, served: bool) -> None:
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = live.model_name
            response = case.call(base_url=live.url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            if response.status_code >= 400 and case.path != "/metrics":
                assert set(response.json()) == {"error"}, response.text

        check()
        assert any(status == 200 for status in seen) and any(status >= 400 for status in seen), seen


numbers = st.one_of(st.none(), st.integers(-3, 10**20), st.floats(), st.sampled_from([0, 1e-300, 1e-6]))
texts = st.text(max_size=40)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "developer"]),
            "content": st.one_of(texts, st.just(DOC_A[:800])),
        }
    ),
    min_size=1,
    max_size=4,
)
compressions = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "method": st.sampled_from([*list_methods(), "none", "nope"]), "ratio": numbers,
    "options": st.dictionaries(st.sampled_from(["window", "n_sink", "scorer", "x"]), numbers | texts, max_size=2),
    "budget_policy": st.sampled_from([None, "adakv", "pyramid", "nope"])}))  # fmt: skip
chat_bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={"temperature": numbers, "top_p": numbers, "seed": numbers, "max_tokens": numbers,
              "stop": st.one_of(texts, st.lists(texts, max_size=5)), "stream": st.booleans(),
              "kv_compression": compressions},
)  # fmt: skip


def test_chat_bodies_that_reach_the_model_get_no_server_error(model_dir: Path) -> None:
    with live_server(model_dir, max_tokens_limit=4, max_prompt_tokens=600) as live:
        statuses: set[int] = set()

        @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=chat_bodies)
        def check(body: dict[str, Any]) -> None:
            raw = json.dumps({"model": live.model_name, **body}).encode()  # NaN and Infinity written as Python does
            response = live.post("/v1/chat/completions", data=raw, headers={"content-type": "application/json"})
            statuses.add(response.status_code)
            assert response.status_code < 500, (body, response.text)
            assert "Traceback" not in response.text
            if response.status_code >= 400:
                assert set(response.json()) == {"error"}, response.text
            elif body.get("stream"):
                assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text, response.text

        check()
        assert 200 in statuses and 400 in statuses, statuses

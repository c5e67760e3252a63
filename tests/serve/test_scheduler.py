"""Many clients at once (continuous batching): every request completes with the answer it gets alone, whatever
requests over other documents and compression settings run beside it; decode steps batch several rows; a client that
leaves frees its row while the others go on; and a full queue is a 503 (not a wait without end)."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from tests.serve.live import QUESTIONS, Live, live_server, wait_until
from tests.tiny import training_corpus

DOCS = [" ".join(training_corpus(400)[100:108]), " ".join(training_corpus(400)[120:128])]


def test_concurrent_clients_get_the_sequential_answers(server: Live) -> None:
    work = [(d, q) for d in range(2) for q in range(2)]
    alone = {(d, q): server.chat(QUESTIONS[q], system=DOCS[d], max_tokens=10).choices[0].message.content
             for d, q in work}  # fmt: skip
    held = server.metrics()["kvsqueeze_context_kv_bytes"]
    before = server.metrics()

    def client(i: int) -> list[tuple[tuple[int, int], str]]:  # 4 requests, one after another
        mine = [work[(i + j) % 4] for j in range(4)]
        return [(k, server.chat(QUESTIONS[k[1]], system=DOCS[k[0]], max_tokens=10).choices[0].message.content)
                for k in mine]  # fmt: skip

    with ThreadPoolExecutor(16) as pool:  # 16 clients at once
        results = [pair for pairs in pool.map(client, range(16)) for pair in pairs]
    assert len(results) == 64
    assert all(text == alone[key] for key, text in results)
    after = server.metrics()
    assert after["kvsqueeze_prefills_total"] == before["kvsqueeze_prefills_total"]  # both documents were cached
    assert after["kvsqueeze_context_kv_bytes"] == held  # answering added nothing to what the contexts hold
    assert after["kvsqueeze_running_requests"] == 0 and after["kvsqueeze_queued_requests"] == 0
    rows = after["kvsqueeze_batch_rows_sum"] - before["kvsqueeze_batch_rows_sum"]
    generated = after["kvsqueeze_generated_tokens_total"] - before["kvsqueeze_generated_tokens_total"]
    assert rows == generated  # every row of every step took one token


COMPRESSIONS = [
    {"method": "knorm", "ratio": 0.5},
    {"method": "snapkv", "ratio": 0.25, "options": {"window": 4}},
    {"method": "none"},
]


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def streamed(live: Live, question: str, system: str, max_tokens: int) -> tuple[requests.Response, Iterator[str]]:
    """A greedy streamed chat over `system` whose first text has arrived (its row is decoding): (the response, an
    iterator of its text pieces, the first one included, to the end of the answer)."""
    body = {"model": live.model_name, "messages": [{"role": "system", "content": system},
            {"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}  # fmt: skip
    response = live.post("/v1/chat/completions", body, stream=True)
    chunks = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {"))
    assert next(chunks)["choices"][0]["delta"]["role"] == "assistant"
    first = next(chunks)["choices"][0]
    pieces = (c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return response, itertools.chain([first["delta"].get("content") or ""], pieces)


def test_requests_over_other_documents_and_compressions_share_decode_steps(server: Live) -> None:
    work = [(d, c, q) for d in range(2) for c in range(3) for q in range(2) if (d + c + q) % 2 == 0]  # 6 requests

    def ask(key: tuple[int, int, int]) -> str | None:
        d, c, q = key
        reply = server.chat(QUESTIONS[q], system=DOCS[d], max_tokens=12,
                            extra_body={"kv_compression": COMPRESSIONS[c]})  # fmt: skip
        return reply.choices[0].message.content

    alone = {key: ask(key) for key in work}  # one at a time; each context cached
    before = server.metrics()
    holder, _ = streamed(server, QUESTIONS[0], DOCS[1], 400)  # a row running while the others arrive
    with ThreadPoolExecutor(len(work)) as pool:
        together = dict(zip(work, pool.map(ask, work), strict=True))
    holder.close()
    assert together == alone
    wait_until(lambda: server.metrics()["kvsqueeze_running_requests"] == 0, what="the batch to empty")
    after = server.metrics()
    steps = delta(before, after, "kvsqueeze_batch_rows_count")
    single = delta(before, after, "kvsqueeze_batch_rows_bucket{le=1.0}")
    assert steps > single  # some steps decoded several rows: rows over different contexts and compressions
    assert delta(before, after, "kvsqueeze_prefills_total") == 0
    assert delta(before, after, "kvsqueeze_batch_rows_sum") == delta(before, after, "kvsqueeze_generated_tokens_total")


def test_a_client_leaving_frees_its_row_while_the_others_go_on(server: Live) -> None:
    want = server.chat(QUESTIONS[1], system=DOCS[0], max_tokens=60)
    before = server.metrics()
    leaving, _ = streamed(server, QUESTIONS[0], DOCS[1], 400)
    staying, pieces = streamed(server, QUESTIONS[1], DOCS[0], 60)
    leaving.close()  # mid-stream: its row leaves at the next step
    wait_until(lambda: delta(before, server.metrics(), "kvsqueeze_cancelled_requests_total") == 1,
               what="the row to be freed")  # fmt: skip
    assert "".join(pieces) == want.choices[0].message.content  # the other row went on, to the answer it gets alone
    staying.close()
    wait_until(lambda: server.metrics()["kvsqueeze_running_requests"] == 0, what="the batch to empty")
    after = server.metrics()
    assert delta(before, after, "kvsqueeze_generated_tokens_total") < 400 + 60  # the leaving row stopped early


def test_a_client_leaving_mid_stream_stops_its_generation(server: Live) -> None:
    before = server.metrics()
    body = {"model": server.model_name, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 500,
            "temperature": 0, "stream": True}  # fmt: skip
    response = server.post("/v1/chat/completions", body, stream=True)
    lines = response.iter_lines()
    assert next(lines).startswith(b"data: ")
    assert next(lines) == b"" and next(lines).startswith(b"data: ")  # a second chunk: the answer is being generated
    response.close()  # the client goes away
    wait_until(lambda: server.metrics()["kvsqueeze_cancelled_requests_total"] > before[
        "kvsqueeze_cancelled_requests_total"], what="the generation to be cancelled")  # fmt: skip
    wait_until(lambda: server.metrics()["kvsqueeze_running_requests"] == 0, what="the row to be dropped")
    generated = server.metrics()["kvsqueeze_generated_tokens_total"] - before["kvsqueeze_generated_tokens_total"]
    assert generated < 500
    assert server.chat("Hello", max_tokens=2).choices[0].message.content is not None  # the server goes on


@pytest.mark.parametrize(
    "compression",
    [{"method": "h2o", "ratio": 0.5}, {"method": "think", "ratio": 0.0, "options": {"key_channel_ratio": 0.5}}],
    ids=["compresses-while-decoding", "thin-keys"],
)
def test_a_request_that_cannot_share_the_batch_waits_for_it_to_empty(server: Live, compression: dict) -> None:
    def ask() -> str | None:
        reply = server.chat(QUESTIONS[1], system=DOCS[0], max_tokens=10, extra_body={"kv_compression": compression})
        return reply.choices[0].message.content

    alone = ask()
    holder, _ = streamed(server, QUESTIONS[0], DOCS[1], 400)  # knorm, no decoding-time method; runs to 400 tokens
    answers: list[str | None] = []
    waiting = threading.Thread(target=lambda: answers.append(ask()), daemon=True)
    waiting.start()
    wait_until(lambda: server.metrics()["kvsqueeze_queued_requests"] == 1, what="the request to wait")
    assert waiting.is_alive() and server.metrics()["kvsqueeze_running_requests"] == 1  # it did not join
    holder.close()  # the batch empties: it runs
    waiting.join(60)
    assert answers == [alone]


def test_a_full_queue_is_503(model_dir: Path) -> None:
    with live_server(model_dir, max_queue=1, max_batch=1, max_tokens_limit=1000) as live:  # one row runs at a time
        body = {"model": live.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000,
                "temperature": 0, "stream": True}  # fmt: skip
        running = live.post("/v1/chat/completions", body, stream=True)  # keeps the model busy
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith(b"data: ")
        waiting = threading.Thread(target=lambda: live.chat("Hello", max_tokens=2), daemon=True)
        waiting.start()  # waits in the queue behind the running one
        wait_until(lambda: live.metrics()["kvsqueeze_queued_requests"] == 1, what="a queued request")
        with pytest.raises(openai.APIStatusError) as err:
            live.chat("Hello again", max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "server_overloaded"
        running.close()
        waiting.join(60)
        assert not waiting.is_alive()

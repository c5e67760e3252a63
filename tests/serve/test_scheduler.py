"""Many clients at once: every request completes with the answer it gets alone, a client that leaves stops its
generation, and a full queue is a 503 (not a wait without end)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.serve.live import QUESTIONS, Live, live_server, wait_until
from tests.tiny import training_corpus

DOCS = [" ".join(training_corpus(400)[100:108]), " ".join(training_corpus(400)[120:128])]


def test_concurrent_clients_get_the_sequential_answers(server: Live) -> None:
    work = [(d, q) for d in range(2) for q in range(2)]
    alone = {(d, q): server.chat(QUESTIONS[q], system=DOCS[d], max_tokens=10).choices[0].message.content
             for d, q in work}  # fmt: skip
    held = server.metrics()["kvsqueeze_context_kv_bytes"]
    before = server.metrics()

    def client(i: int) -> list[tuple[tuple[int, int], str]]:
        mine = [work[i % 4], work[(i + 1) % 4]]
        return [(k, server.chat(QUESTIONS[k[1]], system=DOCS[k[0]], max_tokens=10).choices[0].message.content)
                for k in mine]  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        results = [pair for pairs in pool.map(client, range(8)) for pair in pairs]
    assert len(results) == 16
    assert all(text == alone[key] for key, text in results)
    after = server.metrics()
    assert after["kvsqueeze_prefills_total"] == before["kvsqueeze_prefills_total"]  # both documents were cached
    assert after["kvsqueeze_context_kv_bytes"] == held  # answering added nothing to what the contexts hold
    assert after["kvsqueeze_running_requests"] == 0 and after["kvsqueeze_queued_requests"] == 0
    rows = after["kvsqueeze_batch_rows_sum"] - before["kvsqueeze_batch_rows_sum"]
    batches = after["kvsqueeze_batch_rows_count"] - before["kvsqueeze_batch_rows_count"]
    assert rows == 16 and batches <= 16  # every request decoded once (several per batch when they waited together)


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


def test_a_full_queue_is_503(model_dir: Path) -> None:
    with live_server(model_dir, max_queue=1, max_tokens_limit=1000) as live:
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

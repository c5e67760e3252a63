"""A real kvsqueeze server for the tests: uvicorn on a free loopback port, in a background thread of the test process
(the tiny Llama of tests/tiny.py, loaded from disk as `kvsqueeze serve --model DIR` loads it), and the clients the
tests drive it with: the official `openai` client, `requests` for raw HTTP, and the Prometheus metrics as numbers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import requests
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from kvsqueeze.loading import load_model
from kvsqueeze.serve.app import create_app
from kvsqueeze.serve.settings import ServerSettings
from tests.tiny import training_corpus

# Two documents of about 300 tokens of the tiny tokenizer (the tiny model has 1024 positions).
DOC_A = " ".join(training_corpus(400)[20:30])
DOC_B = " ".join(training_corpus(400)[40:50])
QUESTIONS = ["Where did the ship go?", "Who built the tower?"]


@dataclass
class Live:
    """A running server: its URL, the model name it serves, and its model and tokenizer (used by its worker only)."""

    url: str
    model_name: str
    model: Any
    tokenizer: Any
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs: Any) -> openai.OpenAI:
        options = {"api_key": self.api_key or "unused", "max_retries": 0, "timeout": 120.0, **kwargs}
        return openai.OpenAI(base_url=f"{self.url}/v1", **options)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.post(self.url + path, json=body, headers=headers, timeout=120, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers={**self.headers, **kwargs.pop("headers", {})}, timeout=60)

    def delete(self, path: str) -> requests.Response:
        return requests.delete(self.url + path, headers=self.headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels appended as name{key=value,...})."""
        return parse_metrics(self.get("/metrics").text)

    def chat(self, question: str, system: str | None = None, **kwargs: Any) -> Any:
        """A greedy chat completion through the openai client."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        kwargs.setdefault("temperature", 0)
        kwargs.setdefault("max_tokens", 8)
        return self.client().chat.completions.create(model=self.model_name, messages=messages, **kwargs)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, seconds: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def live_server(model_dir: Path, **settings: Any) -> Iterator[Live]:
    """A server over the model saved in `model_dir`, with `settings` over ServerSettings' defaults."""
    model, tokenizer = load_model(str(model_dir))
    config = ServerSettings(model_name=str(model_dir), **settings)
    app = create_app(model, tokenizer, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="the server to start")
        assert server.started, "the server did not start"
        yield Live(f"http://127.0.0.1:{port}", str(model_dir), model, tokenizer, config.api_key)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()

"""`kvsqueeze serve` as a user starts it, and a restart: contexts compressed by one server with --cache-dir are
answered by the next one without a prefill, with the same answers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

import kvsqueeze
from tests.cli.run_cli import run_cli_without
from tests.serve.live import DOC_A, DOC_B, QUESTIONS, Live, free_port, live_server, parse_metrics, wait_until

SRC = Path(kvsqueeze.__file__).resolve().parents[1]


@contextmanager
def cli_server(args: list[str]) -> Iterator[str]:
    """`python -m kvsqueeze serve ARGS` in a subprocess; yields its URL once /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "kvsqueeze", "serve", "--port", str(port), "-q", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.communicate()[1][-3000:]}")
        try:
            return requests.get(f"{url}/health", timeout=1).ok
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, 90, "the server to answer /health")
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_a_restarted_server_answers_from_its_cache_dir(model_dir: Path, tmp_path: Path) -> None:
    with live_server(model_dir, cache_dir=tmp_path) as first:
        cid = first.post("/v1/contexts", {"text": DOC_A}).json()["id"]
        over_context = first.chat(QUESTIONS[0], extra_body={"context_id": cid}).choices[0].message.content
        automatic = first.chat(QUESTIONS[1], system=DOC_B).choices[0].message.content
        assert first.metrics()["kvsqueeze_prefills_total"] == 2
    assert len(list(tmp_path.glob("ctx-*.safetensors"))) == 2

    with cli_server(["--model", str(model_dir), "--cache-dir", str(tmp_path)]) as url:
        second = Live(url, str(model_dir), None, None)
        assert second.get(f"/v1/contexts/{cid}").json()["tokens"] > 0
        assert second.chat(QUESTIONS[0], extra_body={"context_id": cid}).choices[0].message.content == over_context
        reply = second.chat(QUESTIONS[1], system=DOC_B)
        assert reply.choices[0].message.content == automatic
        assert reply.model_extra["kvsqueeze"]["context_cache"] == "disk"
        metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=10).text)
        assert metrics["kvsqueeze_prefills_total"] == 0
        assert metrics["kvsqueeze_context_cache_hits_total{where=disk}"] == 2


def test_serve_without_the_extra_says_what_to_install() -> None:
    done = run_cli_without("fastapi", ["serve"])  # as if the `serve` extra were not installed
    assert done.returncode == 1, done.stderr
    assert 'pip install "kvsqueeze[serve]"' in done.stderr and "Traceback" not in done.stderr

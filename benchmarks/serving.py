"""`kvsqueeze serve` measured from the outside: a real server process on a loopback port, driven by the official
`openai` client, on the embedded SmolLM2-135M (float32, CPU) with passkey documents of about 6,000 tokens.

What it measures (each request a streamed chat completion: the document as the system message, the question as the
user message, greedy):
- time to first token (TTFT) in four cases, interleaved over `--repeats` fresh documents:
  * `cold, knorm 0.5`: a document the server has not seen, compressed (prefill + compression + question + 1 token);
  * `hit, knorm 0.5`: the same document again with another question (its compressed context reused);
  * `cold, uncompressed`: another fresh document with `"method": "none"`, what a server without compressed context
    caching pays on every request (a full re-prefill);
  * `hit, uncompressed`: that document again (a prefix cache that keeps every token, as vLLM's does);
- memory per document: the KV bytes a cached context holds (`POST /v1/contexts`, measured from its storages), and the
  server process's resident memory before and after the documents were cached;
- throughput over one cached document: the same `--requests` requests of `--max-tokens` tokens sent by 1 client one
  after another, then split between 4 and 16 clients sending at once (threads); generated tokens per second over the
  wall time, its ratio to 1 client's, each request's latency and time to first token (p50, p95).

The server runs with `--max-batch 16` so that 16 clients share one batch. Run it alone on the machine: every figure is
a wall time.

    PYTHONPATH=src .venv/bin/python benchmarks/serving.py
Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import requests
import torch
from transformers import AutoTokenizer

from kvsqueeze.bench.metrics import score
from kvsqueeze.bench.tasks import Sample, get_task
from kvsqueeze.loading import DEFAULT_MODEL, model_dir

OUT = Path(__file__).parent / "results"
KNORM = {"method": "knorm", "ratio": 0.5}
NONE = {"method": "none"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen
    url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600.0)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


def start_server(max_batch: int, threads: int | None) -> Server:
    port = free_port()
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "kvsqueeze", "serve", "--port", str(port), "--max-batch", str(max_batch),
               "--max-cache-bytes", "8GiB", "--max-tokens-limit", "256", "-q"]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return Server(process, url)
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 10 minutes")


def messages(sample: Sample, question: int = 0) -> list[dict[str, str]]:
    return [{"role": "system", "content": sample.context}, {"role": "user", "content": sample.questions[question]}]


def streamed(server: Server, sample: Sample, compression: dict[str, Any], max_tokens: int, question: int = 0) -> dict:
    """One streamed chat completion: time to the first text, total time, the text, its tokens and cache status."""
    start = time.perf_counter()
    first, parts, usage, cache = None, [], None, None
    stream = server.client().chat.completions.create(
        model=DEFAULT_MODEL, messages=messages(sample, question), temperature=0, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"kv_compression": compression},
    )  # fmt: skip
    for chunk in stream:
        extra = chunk.model_extra or {}
        cache = (extra.get("kvsqueeze") or {}).get("context_cache", cache)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter() - start
                parts.append(choice.delta.content)
    text = "".join(parts)
    return {
        "ttft": first if first is not None else time.perf_counter() - start,
        "seconds": time.perf_counter() - start,
        "text": text,
        "tokens": usage.completion_tokens if usage is not None else None,
        "context_cache": cache,
        "correct": score(text, sample.answers[question], sample.metric),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ttft_study(server: Server, docs: list[Sample], max_tokens: int) -> dict[str, list[dict]]:
    """Per repeat: a fresh document compressed (cold, then hit), another fresh one uncompressed (cold, then hit)."""
    out: dict[str, list[dict]] = {"cold, knorm 0.5": [], "hit, knorm 0.5": [], "cold, uncompressed": [],
                                  "hit, uncompressed": []}  # fmt: skip
    pairs = [(docs[2 * i], docs[2 * i + 1]) for i in range(len(docs) // 2)]
    for i, (a, b) in enumerate(pairs):
        order = [(a, KNORM, "knorm 0.5"), (b, NONE, "uncompressed")]
        if i % 2:
            order.reverse()  # neither kind always runs first
        for doc, compression, label in order:
            out[f"cold, {label}"].append(streamed(server, doc, compression, max_tokens))
            out[f"hit, {label}"].append(streamed(server, doc, compression, max_tokens, question=len(doc.questions) - 1))
        print(f"  repeat {i + 1}/{len(pairs)}: " + ", ".join(f"{k} {v[-1]['ttft']:.2f} s" for k, v in out.items()),
              flush=True)  # fmt: skip
    return out


def context_bytes(server: Server, doc: Sample, compression: dict[str, Any]) -> dict[str, Any]:
    reply = requests.post(server.url + "/v1/contexts", json={"text": doc.context, "kv_compression": compression},
                          timeout=600)  # fmt: skip
    reply.raise_for_status()
    body = reply.json()
    return {k: body[k] for k in ("tokens", "kv_bytes_before", "kv_bytes_after", "found")}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def throughput(server: Server, doc: Sample, clients: int, total: int, max_tokens: int) -> dict[str, Any]:
    """`clients` threads sending `total` requests over the (cached) document between them, each client one request
    after another (1 client: the same requests sequentially)."""
    per_client = total // clients
    results: list[dict] = []
    lock = threading.Lock()

    def client_loop() -> None:
        for _ in range(per_client):
            r = streamed(server, doc, KNORM, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] or 0 for r in results)
    return {
        "clients": clients, "requests": len(results), "wall_seconds": wall, "generated_tokens": tokens,
        "tokens_per_second": tokens / wall, "requests_per_second": len(results) / wall,
        "median_latency": median([r["seconds"] for r in results]), "median_ttft": median([r["ttft"] for r in results]),
        "p95_ttft": percentile([r["ttft"] for r in results], 95), "ttfts": [r["ttft"] for r in results],
        "hits": sum(r["context_cache"] == "memory" for r in results),
    }  # fmt: skip


def metrics(server: Server) -> dict[str, float]:
    out = {}
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("kvsqueeze_prefills_total") or line.startswith("kvsqueeze_batch_rows_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "# Serving: time to first token, memory per document, throughput",
        "",
        f"`kvsqueeze serve` on {s['model']} (float32, CPU: {s['machine']}), driven over loopback by the official "
        f"`openai` client with streamed, greedy chat completions; passkey documents of {s['context_tokens']} tokens "
        f"(target {s['tokens']}), {s['repeats']} fresh documents per kind, interleaved. Command: `{s['command']}`.",
        "",
        "## Time to first token",
        "",
        "| request | median TTFT (s) | min | max | answers correct |",
        "|---|---|---|---|---|",
    ]
    for label, runs in doc["ttft"].items():
        t = [r["ttft"] for r in runs]
        ok = sum(r["correct"] for r in runs)
        lines.append(f"| {label} | {median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {ok:g}/{len(runs)} |")
    r = doc["ratios"]
    lines += [
        "",
        f"A cached compressed document answers its first token {r['cold_none_over_hit_knorm']:.1f}x sooner than an "
        f"uncompressed re-prefill of the same length (median over median), and {r['cold_knorm_over_hit_knorm']:.1f}x "
        "sooner than its own first (cold) request.",
        "",
        "## Memory per document",
        "",
        "| compression | tokens | KV bytes held | MiB |",
        "|---|---|---|---|",
    ]
    for label, m in doc["memory"].items():
        if isinstance(m, dict):
            lines.append(f"| {label} | {m['tokens']} | {m['kv_bytes_after']} | {m['kv_bytes_after'] / 2**20:.1f} |")
    lines += [
        "",
        f"Server resident memory: {doc['memory']['rss_start_mib']:.0f} MiB after start, "
        f"{doc['memory']['rss_end_mib']:.0f} MiB at the end (every document above cached).",
        "",
        "## Throughput over one cached document (knorm 0.5)",
        "",
        f"The same {doc['throughput'][0]['requests']} requests ({s['max_tokens']} new tokens each) sent by 1 client "
        "one after another, then split between more clients sending at once.",
        "",
        "| clients | requests | generated tokens/s | vs 1 client | requests/s | median latency (s) | TTFT p50 (s) "
        "| TTFT p95 (s) | hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    alone = doc["throughput"][0]["tokens_per_second"]
    for t in doc["throughput"]:
        lines.append(f"| {t['clients']} | {t['requests']} | {t['tokens_per_second']:.1f} | "
                     f"{t['tokens_per_second'] / alone:.2f}x | {t['requests_per_second']:.2f} | "
                     f"{t['median_latency']:.2f} | {t['median_ttft']:.2f} | {t['p95_ttft']:.2f} | "
                     f"{t['hits']}/{t['requests']} |")  # fmt: skip
    lines += ["", f"Server metrics at the end: `{json.dumps(doc['metrics'])}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=6000, help="document length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="fresh documents per TTFT kind")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=32, help="requests per throughput run, split between clients")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--out", type=Path, default=OUT / "serving")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(model_dir(DEFAULT_MODEL))
    docs = get_task("passkey").samples(tokenizer, args.tokens, 2 * args.repeats + 1, seed=7)
    server = start_server(max_batch=16, threads=None)
    try:
        rss_start = server.rss_mib()
        streamed(server, docs[-1], KNORM, 2)  # warm-up: first forwards of the process, and docs[-1] gets cached
        print(f"TTFT over {args.repeats} repeats ...", flush=True)
        ttft = ttft_study(server, docs[:-1], args.max_tokens)
        memory: dict[str, Any] = {
            "knorm 0.5": context_bytes(server, docs[0], KNORM),
            "uncompressed": context_bytes(server, docs[1], NONE),
        }
        rates = []
        for clients in (int(c) for c in args.clients.split(",")):
            print(f"throughput, {clients} client(s) ...", flush=True)
            rates.append(throughput(server, docs[-1], clients, args.requests, args.max_tokens))
        memory["rss_start_mib"], memory["rss_end_mib"] = rss_start, server.rss_mib()
        final = metrics(server)
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)
    hit = median([r["ttft"] for r in ttft["hit, knorm 0.5"]])
    doc = {
        "settings": {
            "model": DEFAULT_MODEL, "tokens": args.tokens, "context_tokens": len(tokenizer(docs[0].context).input_ids),
            "repeats": args.repeats, "max_tokens": args.max_tokens, "throughput_requests": args.requests,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "command": "PYTHONPATH=src .venv/bin/python benchmarks/serving.py " + " ".join(sys.argv[1:]),
        },
        "ttft": ttft,
        "ratios": {
            "cold_none_over_hit_knorm": median([r["ttft"] for r in ttft["cold, uncompressed"]]) / hit,
            "cold_knorm_over_hit_knorm": median([r["ttft"] for r in ttft["cold, knorm 0.5"]]) / hit,
        },
        "memory": memory,
        "throughput": rates,
        "metrics": final,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()

"""Decoding-time compression on the embedded SmolLM2-135M model: decode speed and memory on a long generation, and
perplexity of a long text scored token by token, with and without compression, per scorer and target.

1. Long generation: a --context-tokens prompt (the bundled example document), then --new-tokens greedy tokens
   (EOS ignored: generation always runs the full length). Reported: decode tokens/s, peak and final KV bytes
   (the cache's own tracker), and how many generated tokens agree with the uncompressed run.
2. Perplexity: the first --ppl-tokens tokens of the example document scored one token per step after a
   --ppl-prefix-token prefill (`kvsqueeze.bench.perplexity.score_tokens`), under `DecodingCompression` for each
   scorer and target, against no compression.

Run (about 10-20 minutes on 2 CPU cores):
    PYTHONPATH=src .venv/bin/python benchmarks/decoding.py
Smoke test: ... --context-tokens 64 --new-tokens 24 --targets 32 --every 8 --ppl-tokens 80 --out /tmp/decoding
Results: benchmarks/results/decoding.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers

import kvsqueeze as kvs
from kvsqueeze.bench.perplexity import score_tokens

OUT = Path(__file__).parent / "results"
SCORERS = ("knorm", "streaming_llm", "snapkv")


def document_ids(tokenizer: Any, n: int) -> torch.Tensor:
    """The first n tokens of the example document (repeated if it is shorter)."""
    text = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())["context"]
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:n]])


@torch.no_grad()
def long_generation(model: Any, prompt: torch.Tensor, new: int, method: kvs.Method | None) -> dict[str, Any]:
    """Greedy generation of exactly `new` tokens (EOS ignored) under `method`; decode speed and KV bytes."""
    cache = kvs.KVCache(model.config)
    tokens: list[int] = []
    with kvs.compress(model, method):
        logits = model(input_ids=prompt, past_key_values=cache, logits_to_keep=1).logits[0, -1]
        start = time.perf_counter()
        for _ in range(new):
            token = int(logits.argmax())
            tokens.append(token)
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
        seconds = time.perf_counter() - start
    stats = kvs.cache_stats(cache)
    return {"tokens": tokens, "decode_tokens_per_second": new / seconds, "decode_seconds": seconds,
            "peak_kv_bytes": stats.peak_kv_bytes, "kv_bytes_end": stats.kv_bytes,
            "kept_end": stats.tokens_kept[0] if stats.tokens_kept else 0}  # fmt: skip


def build(scorer: str, target: int, every: int) -> kvs.Method:
    options = {"window": min(64, target // 2)} if scorer == "snapkv" else {}
    return kvs.DecodingCompression(scorer=kvs.get_method(scorer, **options), target_tokens=target, every=every)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--targets", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--every", type=int, default=64)
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS))
    parser.add_argument("--ppl-tokens", type=int, default=1536)
    parser.add_argument("--ppl-prefix", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = kvs.load_model()
    runs: list[tuple[str, int | None]] = [("none", None)] + [(s, t) for s in args.scorers for t in args.targets]

    generation = []
    prompt = document_ids(tokenizer, args.context_tokens)
    reference: list[int] = []
    for scorer, target in runs:
        method = None if target is None else build(scorer, target, args.every)
        row = long_generation(model, prompt, args.new_tokens, method)
        tokens = row.pop("tokens")
        reference = reference or tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(tokens))
        generation.append({"scorer": scorer, "target": target, "every": args.every, "repr": repr(method), **row,
                           "tokens_equal_to_uncompressed_prefix": same})  # fmt: skip
        print(f"generate {scorer:14s} target {target or '-':>5}: {row['decode_tokens_per_second']:6.1f} tok/s, "
              f"peak KV {_mib(row['peak_kv_bytes'])} MiB, first {same} tokens as uncompressed", flush=True)  # fmt: skip

    perplexity = []
    text = document_ids(tokenizer, args.ppl_tokens)
    for scorer, target in runs:
        method = None if target is None else build(scorer, target, args.every)
        start = time.perf_counter()
        score = score_tokens(model, text, method, prefix=args.ppl_prefix)
        perplexity.append({"scorer": scorer, "target": target, "every": args.every, "repr": repr(method),
                           "perplexity": score.perplexity, "mean_nll": float(score.nll.mean()),
                           "peak_kv_bytes": score.peak_kv_bytes, "seconds": time.perf_counter() - start})  # fmt: skip
        print(f"perplexity {scorer:14s} target {target or '-':>5}: {score.perplexity:8.3f}", flush=True)

    meta = {"model": "SmolLM2-135M-Instruct (embedded, float32)", "threads": args.threads,
            "context_tokens": args.context_tokens, "new_tokens": args.new_tokens, "every": args.every,
            "ppl_tokens": args.ppl_tokens, "ppl_prefix": args.ppl_prefix, "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine()}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "generation": generation, "perplexity": perplexity}
    (args.out / "decoding.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"Decoding-time compression (`DecodingCompression`, every {args.every} steps), {meta['model']}, CPU "
        f"x{args.threads} threads.",
        "",
        f"Long generation: {args.context_tokens}-token prompt, {args.new_tokens} new tokens (EOS ignored).",
        "",
        "| scorer | target | decode tok/s | peak KV (MiB) | KV at the end (MiB) | tokens equal to uncompressed |",
        "|---|---|---|---|---|---|",
    ]
    for r in generation:
        lines.append(f"| {r['scorer']} | {r['target'] or '-'} | {r['decode_tokens_per_second']:.1f} "
                     f"| {_mib(r['peak_kv_bytes'])} | {_mib(r['kv_bytes_end'])} "
                     f"| {r['tokens_equal_to_uncompressed_prefix']} |")  # fmt: skip
    lines += [
        "",
        f"Perplexity of the example document's first {args.ppl_tokens} tokens, one token per step after a "
        f"{args.ppl_prefix}-token prefill.",
        "",
        "| scorer | target | perplexity | mean NLL | peak KV (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in perplexity:
        ppl = r["perplexity"] if math.isfinite(r["perplexity"]) else float("nan")
        lines.append(f"| {r['scorer']} | {r['target'] or '-'} | {ppl:.3f} | {r['mean_nll']:.4f} "
                     f"| {_mib(r['peak_kv_bytes'])} |")  # fmt: skip
    (args.out / "decoding.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Where each method's kept tokens go on the passkey task: does the needle survive, and how much of the budget goes to
the end of the prompt? A mechanistic companion to the accuracy study (benchmarks/results/accuracy_passkey).

For each passkey sample (the benchmark's generator, ~1k tokens, query-agnostic prompt: the question comes after the
compressed context), the prompt is prefilled once and compressed by each method at each ratio. Reported per method
and ratio, averaged over samples:
- needle kept: the share of (layer, KV head) pairs that keep every token of at least one copy of the pass key's
  digits (the needle states the key twice);
- tail share: the share of kept tokens that lie in the last 10% of the context (where the chat template's closing
  tokens and the final filler sentences are).

Run (a few minutes on 2 CPU cores):
    .venv/bin/python benchmarks/needle_retention.py --samples 10
Results: benchmarks/results/needle_retention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvsqueeze as kvs
from kvsqueeze.bench.tasks import get_task
from kvsqueeze.cache import KVCache
from kvsqueeze.prompts import encode_prompt
from kvsqueeze.recording import compress_recording, record

OUT = Path(__file__).parent / "results"
METHODS = ("knorm", "streaming_llm", "snapkv", "tova", "observed_attention", "expected_attention", "qfilters")


def digit_spans(ids: list[int], key_ids: list[int]) -> list[range]:
    """Every place the token sequence `key_ids` occurs in `ids`."""
    n = len(key_ids)
    return [range(i, i + n) for i in range(len(ids) - n + 1) if ids[i : i + n] == key_ids]


def measure(cache: KVCache, spans: list[range], n_ctx: int) -> tuple[float, float]:
    """(share of layer-heads keeping one full copy of the key, share of kept tokens in the last 10%)."""
    kept_needle, heads, tail, kept = 0, 0, 0, 0
    for layer in cache.kv_layers():
        if layer.positions is None or layer.is_sliding:
            continue
        _, _, pos = layer.view()
        for h in range(pos.shape[1]):
            p = set(pos[0, h][pos[0, h] >= 0].tolist())
            heads += 1
            kept_needle += any(all(i in p for i in span) for span in spans)
            tail += sum(1 for i in p if i >= 0.9 * n_ctx)
            kept += len(p)
    return kept_needle / heads, tail / kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    model, tokenizer = kvs.load_model()
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for sample in get_task("passkey").samples(tokenizer, args.length, args.samples, 0):
        ids, _ = encode_prompt(tokenizer, sample.context, list(sample.questions), sample.answer_prefix)
        key = sample.answers[0][0]
        spans = digit_spans(ids, tokenizer(key, add_special_tokens=False)["input_ids"])
        if not spans:
            spans = digit_spans(ids, tokenizer(" " + key, add_special_tokens=False)["input_ids"])
        if not spans:
            print(f"sample {sample.index}: key {key} not found as a token sequence; skipped")
            continue
        cache = KVCache(model.config)
        with torch.no_grad(), record(model, cache) as rec:
            x = torch.tensor([ids])
            model(input_ids=x, attention_mask=torch.ones_like(x), past_key_values=cache)
        for name in methods:
            for ratio in ratios:
                compressed, _ = compress_recording(rec, kvs.get_method(name, ratio=ratio))
                results.setdefault(name, {}).setdefault(str(ratio), []).append(measure(compressed, spans, len(ids)))
        print(f"sample {sample.index} done", flush=True)
    OUT.mkdir(exist_ok=True)
    summary = {
        m: {r: {"needle_kept": sum(v[0] for v in vals) / len(vals), "tail_share": sum(v[1] for v in vals) / len(vals),
                "samples": len(vals)} for r, vals in per.items()}
        for m, per in results.items()
    }  # fmt: skip
    (OUT / "needle_retention.json").write_text(json.dumps({"length": args.length, "summary": summary}, indent=2))
    lines = [
        f"Passkey, {args.length} tokens, {args.samples} samples, query-agnostic (`python benchmarks/needle_retention.py"
        f" --samples {args.samples}`). needle kept = share of (layer, KV head) pairs keeping one whole copy of the key;"
        " tail share = share of kept tokens in the last 10% of the context (10% of tokens).",
        "",
        "| method | "
        + " | ".join(f"needle kept @{r}" for r in ratios)
        + " | "
        + " | ".join(f"tail share @{r}" for r in ratios)
        + " |",
        "|---|" + "---|" * (2 * len(ratios)),
    ]
    for m, per in summary.items():
        cells = [f"{per[str(r)]['needle_kept']:.2f}" for r in ratios]
        cells += [f"{per[str(r)]['tail_share']:.2f}" for r in ratios]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (OUT / "needle_retention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Where each method's kept tokens go on the passkey task: does the needle survive, and how much of the budget goes to
the end of the prompt? A mechanistic companion to the accuracy study (benchmarks/results/accuracy_passkey).

For each passkey sample (the benchmark's generator, ~1k tokens, query-agnostic prompt: the question comes after the
compressed context), the prompt is prefilled once and compressed by each method at each ratio. Reported per method
and ratio, averaged over samples:
- needle kept: the share of (layer, KV head) pairs that keep every token of at least one copy of the pass key's
  digits (the needle states the key twice);
- tail share: the share of kept tokens that lie in the last 10% of the context (where the chat template's closing
  tokens and the final filler sentences are).

With `--task passkey_varied` the samples come from the varied generator (three haystack sources, four phrasings,
three value formats) and the tables also break "needle kept" down by haystack source and by layer (the share of the
layer's KV heads keeping a copy). A method may carry options, `NAME:KEY=VALUE:KEY=VALUE`, and a budget policy,
`adakv(NAME)`; e.g. `expected_attention:use_vnorm=false`.

Run (a few minutes on 2 CPU cores):
    .venv/bin/python benchmarks/needle_retention.py --samples 10
    .venv/bin/python benchmarks/needle_retention.py --task passkey_varied --samples 24 --name needle_retention_varied
Results: benchmarks/results/needle_retention.{json,md} (or --name).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvsqueeze as kvs
from kvsqueeze.bench.tasks import get_task
from kvsqueeze.cache import KVCache
from kvsqueeze.methods.registry import with_budget_policy
from kvsqueeze.prompts import encode_prompt
from kvsqueeze.recording import compress_recording, record

OUT = Path(__file__).parent / "results"
METHODS = ("knorm", "streaming_llm", "snapkv", "tova", "observed_attention", "expected_attention", "qfilters")


def digit_spans(ids: list[int], key_ids: list[int]) -> list[range]:
    """Every place the token sequence `key_ids` occurs in `ids`."""
    n = len(key_ids)
    return [range(i, i + n) for i in range(len(ids) - n + 1) if ids[i : i + n] == key_ids]


def measure(cache: KVCache, spans: list[range], n_ctx: int) -> tuple[float, float, list[float]]:
    """(share of layer-heads keeping one full copy of the key, share of kept tokens in the last 10%, that first share
    per layer)."""
    per_layer, tail, kept = [], 0, 0
    for layer in cache.kv_layers():
        if layer.positions is None or layer.is_sliding:
            continue
        _, _, pos = layer.view()
        hits = 0
        for h in range(pos.shape[1]):
            p = set(pos[0, h][pos[0, h] >= 0].tolist())
            hits += any(all(i in p for i in span) for span in spans)
            tail += sum(1 for i in p if i >= 0.9 * n_ctx)
            kept += len(p)
        per_layer.append(hits / pos.shape[1])
    return sum(per_layer) / len(per_layer), tail / kept, per_layer


def parse_method(spec: str, ratio: float) -> kvs.Method:
    """'name', 'name:key=value:...' or 'policy(name...)' as a method at `ratio`."""
    policy = None
    if spec.endswith(")") and "(" in spec:
        policy, spec = spec[:-1].split("(", 1)
    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        options[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    return with_budget_policy(policy, kvs.get_method(name, ratio=ratio, **options), ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated NAME[:KEY=VALUE...] or POLICY(NAME)"
    )
    parser.add_argument("--task", default="passkey", choices=("passkey", "passkey_varied"))
    parser.add_argument("--name", default="needle_retention", help="results file stem")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods.split(",")
    model, tokenizer = kvs.load_model()
    results: dict[str, dict[str, list[tuple[float, float, list[float]]]]] = {}
    sources: dict[str, dict[str, dict[str, list[float]]]] = {}  # method -> ratio -> source -> needle kept
    for sample in get_task(args.task).samples(tokenizer, args.length, args.samples, 0):
        ids, _ = encode_prompt(tokenizer, sample.context, list(sample.questions), sample.answer_prefix)
        key = sample.meta.get("value", sample.answers[0][0])
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
                compressed, _ = compress_recording(rec, parse_method(name, ratio))
                found = measure(compressed, spans, len(ids))
                results.setdefault(name, {}).setdefault(str(ratio), []).append(found)
                source = sample.meta.get("source", "prose")
                sources.setdefault(name, {}).setdefault(str(ratio), {}).setdefault(source, []).append(found[0])
        print(f"sample {sample.index} done", flush=True)
    OUT.mkdir(exist_ok=True)
    summary = {
        m: {
            r: {
                "needle_kept": sum(v[0] for v in vals) / len(vals),
                "tail_share": sum(v[1] for v in vals) / len(vals),
                "samples": len(vals),
                "by_source": {src: sum(k) / len(k) for src, k in sorted(sources[m][r].items())},
                "by_layer": [sum(v[2][i] for v in vals) / len(vals) for i in range(len(vals[0][2]))],
            }
            for r, vals in per.items()
        }
        for m, per in results.items()
    }
    (OUT / f"{args.name}.json").write_text(
        json.dumps({"task": args.task, "length": args.length, "summary": summary}, indent=2)
    )
    command = f"python benchmarks/needle_retention.py --samples {args.samples}"
    if args.task != "passkey":
        command += f" --task {args.task} --name {args.name}"
    lines = [
        f"{args.task}, {args.length} tokens, {args.samples} samples, query-agnostic (`{command}`). needle kept ="
        " share of (layer, KV head) pairs keeping one whole copy of the key; tail share = share of kept tokens in the"
        " last 10% of the context (10% of tokens).",
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
    names = sorted({src for per in summary.values() for cell in per.values() for src in cell["by_source"]})
    lines += ["", "Needle kept by haystack source:", "", "| method | ratio | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for m, per in summary.items():
        for r in ratios:
            by = per[str(r)]["by_source"]
            lines.append(f"| {m} | {r} | " + " | ".join(f"{by[n]:.2f}" if n in by else "" for n in names) + " |")
    depth = len(next(iter(next(iter(summary.values())).values()))["by_layer"])
    lines += ["", "Needle kept by layer (compressed layers in order):", ""]
    lines += ["| method | ratio | " + " | ".join(str(i) for i in range(depth)) + " |", "|---|---|" + "---|" * depth]
    for m, per in summary.items():
        for r in ratios:
            lines.append(f"| {m} | {r} | " + " | ".join(f"{x:.2f}" for x in per[str(r)]["by_layer"]) + " |")
    (OUT / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

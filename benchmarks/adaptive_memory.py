"""Memory held by head-adaptive budgets (ragged storage) vs their uniform scorers, on the bundled example.

The example's context is prefilled once by the embedded SmolLM2-135M model (recorded, `recording.record`); each method
compresses a copy of that prefill (`press.compress_recording`) and answers the example's question over it. Bytes come
from the cache's storages (`cache_stats`): Ada-KV pools each layer's budget across heads, so heads keep different
counts, yet the bytes held must equal the uniform scorer's at the same ratio, up to the ragged layout's metadata.

Run: `.venv/bin/python benchmarks/adaptive_memory.py` (well under a minute on 2 CPU cores).
Results: benchmarks/results/adaptive_memory.{json,md}.
"""

from __future__ import annotations

import json
import platform
from importlib import resources
from pathlib import Path

import torch
import transformers

import kvsqueeze as kvs
from kvsqueeze.generation import answer
from kvsqueeze.prompts import split_prompt
from kvsqueeze.recording import compress_recording, record

OUT = Path(__file__).parent / "results"
RATIO = 0.5
METHODS: list[tuple[str, dict]] = [
    ("knorm", {}),
    ("adakv", {"scorer": "knorm"}),
    ("snapkv", {}),
    ("adakv", {"scorer": "snapkv"}),
    ("expected_attention", {}),
    ("adakv", {"scorer": "expected_attention"}),
    ("criticalkv", {"scorer": "knorm"}),
    ("global_budget", {"scorer": "knorm"}),
]


def main() -> None:
    model, tokenizer = kvs.load_model()
    example = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())
    context, question = split_prompt(tokenizer, example["context"], example["question"], example["answer_prefix"])
    ids = torch.tensor([tokenizer(context, add_special_tokens=False)["input_ids"]])
    cache = kvs.KVCache(model.config)
    with torch.no_grad(), record(model, cache) as rec:
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    full = kvs.cache_stats(cache)
    rows = []
    for name, options in METHODS:
        method = kvs.get_method(name, ratio=RATIO, **options)
        compressed, log = compress_recording(rec, method)
        s = kvs.cache_stats(compressed)
        kept = [layer.kept for layer in compressed.full_layers()]  # (1, H) per layer
        texts = answer(model, tokenizer, compressed, [0], [question], 8).texts
        row = {
            "method": repr(method),
            "kv_bytes": s.kv_bytes,
            "metadata_bytes": s.metadata_bytes,
            "padding_bytes": s.padding_bytes,
            "kept_token_heads": int(sum(int(k.sum()) for k in kept)),
            "ragged_layers": sum(layer.is_ragged for layer in compressed.full_layers()),
            "min_head_kept": int(min(int(k.min()) for k in kept)),
            "max_head_kept": int(max(int(k.max()) for k in kept)),
            "compression_seconds": log.seconds,
            "answer": texts[0],
            "correct": example["answers"][0] in texts[0],
        }
        rows.append(row)
        print(
            f"{row['method'][:60]:60s} kv {s.kv_bytes:>9,d} B  meta {s.metadata_bytes:>7,d} B  pad {s.padding_bytes} "
            f"heads kept {row['min_head_kept']}..{row['max_head_kept']}  {texts[0]!r}",
            flush=True,
        )
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded, float32)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "context_tokens": ids.shape[1],
        "ratio": RATIO,
        "uncompressed_kv_bytes": full.kv_bytes,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "adaptive_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"Bundled example ({meta['context_tokens']} context tokens), {meta['model']}, ratio {RATIO}; uncompressed "
        f"KV {full.kv_bytes:,d} bytes. Bytes from the cache's storages.",
        "",
        "| method | KV bytes | metadata bytes | padding bytes | kept (token, head) | ragged layers "
        "| head kept min..max | answer | correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['method']}` | {r['kv_bytes']:,d} | {r['metadata_bytes']:,d} | {r['padding_bytes']} | "
            f"{r['kept_token_heads']:,d} | {r['ragged_layers']} | {r['min_head_kept']}..{r['max_head_kept']} | "
            f"{' '.join(r['answer'].split())} | {'yes' if r['correct'] else 'no'} |"
        )
    (OUT / "adaptive_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

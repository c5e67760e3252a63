"""Every registered method on the bundled ~1.9k-token example with the embedded SmolLM2-135M model.

Records, per method and ratio: the answer, KV bytes before/after (measured from the cache's storages), prefill and
compression seconds, decode speed. Run: `.venv/bin/python benchmarks/example_methods.py` (about 2 minutes on 2 CPU
cores). Results: benchmarks/results/example_methods.{json,md}.
"""

from __future__ import annotations

import json
import platform
from importlib import resources
from pathlib import Path

import torch
import transformers

import kvsqueeze as kvs

OUT = Path(__file__).parent / "results"
RATIOS = (0.25, 0.5, 0.75)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def main() -> None:
    model, tokenizer = kvs.load_model()
    example = json.loads(resources.files("kvsqueeze.data").joinpath("example.json").read_text())
    runs: list[tuple[str, float]] = [("none", 0.0)] + [(m, r) for m in kvs.list_methods() for r in RATIOS]
    rows = []
    for name, ratio in runs:
        method = None if name == "none" else kvs.get_method(name, ratio=ratio)
        out = kvs.generate(model, tokenizer, example["context"], [example["question"]], method=method,
                           max_new_tokens=8, answer_prefix=example["answer_prefix"])  # fmt: skip
        s = out.stats
        row = {"method": name, "ratio": ratio, "repr": repr(method), "answer": out.answers[0],
               "correct": example["answers"][0] in out.answers[0], **s.to_dict()}  # fmt: skip
        rows.append(row)
        print(f"{name:14s} {ratio:.2f} {s.kv_bytes_before / 2**20:6.1f} -> {s.kv_bytes_after / 2**20:6.1f} MiB "
              f"prefill {s.prefill_seconds:5.2f}s  {out.answers[0]!r}", flush=True)  # fmt: skip
    meta = {"model": "SmolLM2-135M-Instruct (embedded, float32)", "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "context_tokens": rows[0]["tokens_before"]}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "example_methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"Bundled example ({meta['context_tokens']} context tokens), {meta['model']}, CPU x{meta['threads']} threads.",
        "",
        "| method | ratio | KV before (MiB) | KV after (MiB) | prefill s | compression s | answer | correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['kv_bytes_before'] / 2**20:.1f} | {r['kv_bytes_after'] / 2**20:.1f} "
            f"| {r['prefill_seconds']:.2f} | {r['compression_seconds']:.2f} | {_cell(r['answer'])} | "
            f"{'yes' if r['correct'] else 'no'} |"
        )
    (OUT / "example_methods.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Synthetic result rows (as the runner writes them) for the report tests: no model needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvsqueeze.bench.results import CONFIG, RESULTS

SCORES = {"none": {0.0: 1.0}, "knorm": {0.25: 0.75, 0.5: 0.5}, "snapkv": {0.25: 1.0, 0.5: 0.75}}
REPRS = {"none": "none", "knorm": "KNorm(ratio={r})", "snapkv": "SnapKV(ratio={r}, window=8, kernel=5)"}


def rows() -> list[dict[str, Any]]:
    out = []
    for name, by_ratio in SCORES.items():
        for ratio, value in by_ratio.items():
            for task, bonus in (("niah", 0.0), ("vt", -0.5)):
                for length in (64, 128):
                    for q in range(2):
                        out.append({
                            "task": task, "context_length": length, "context_tokens": length + 7, "sample": 0,
                            "question_index": q, "method": REPRS[name].format(r=ratio), "method_name": name,
                            "ratio": ratio, "query_aware": False, "group": str(length), "question": "?",
                            "answers": ["x"], "prediction": "x", "score": max(0.0, value + bonus),
                            "kv_bytes_before": 4 * 2**20, "kv_bytes_after": int(4 * 2**20 * (1 - ratio)),
                            "prefill_seconds": 0.5 + ratio + length / 1000, "compression_seconds": 0.1 * ratio,
                            "decode_tokens_per_second": 20.0, "peak_memory_bytes": 3 * 2**20, "model": "tiny",
                            "seed": 0, "versions": {"kvsqueeze": "0.1.0"},
                        })  # fmt: skip
    return out


def write_results(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows()))
    meta = {"config": {"seed": 0, "query_aware": False}, "model": "tiny", "versions": {"torch": "2"}}
    (out / CONFIG).write_text(json.dumps(meta))
    return out


def answer_row(name: str, ratio: float, score: float, sample: int, task: str = "niah", **extra: Any) -> dict[str, Any]:
    """One result row of method `name` (a key of REPRS) for question 0 of `sample` at 64 tokens."""
    return {
        "task": task, "context_length": 64, "context_tokens": 71, "sample": sample, "question_index": 0,
        "method": REPRS[name].format(r=ratio), "method_name": name, "ratio": ratio, "query_aware": False,
        "group": "64", "question": "?", "answers": ["x"], "prediction": "x", "score": score,
        "kv_bytes_before": 2**20, "kv_bytes_after": int(2**20 * (1 - ratio)), "prefill_seconds": 0.5,
        "compression_seconds": 0.1, "decode_tokens_per_second": 20.0, "peak_memory_bytes": 2**20, "model": "tiny",
        "seed": 0, **extra,
    }  # fmt: skip


def scored_rows(scores: dict[tuple[str, float], list[float]], task: str = "niah") -> list[dict[str, Any]]:
    """Rows of one task: per (method, ratio), question i of the list scores scores[i]."""
    return [answer_row(m, r, s, i, task) for (m, r), values in scores.items() for i, s in enumerate(values)]

"""The benchmark runner on the embedded SmolLM2-135M (slow): a user dataset, the shared prefill and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvsqueeze as kvs
from kvsqueeze.bench.report import write_report
from kvsqueeze.bench.results import RESULTS, read_jsonl
from kvsqueeze.bench.runner import BenchConfig, run_bench

pytestmark = pytest.mark.slow

FILLER = "The market square filled slowly as the bakers opened their shutters. Children chased pigeons. "


def test_bench_on_a_dataset_with_the_embedded_model(tmp_path: Path) -> None:
    rows = [
        {"context": FILLER * 4 + f"The secret number of the lighthouse keeper is {n}. " + FILLER * 4,
         "question": "What is the secret number of the lighthouse keeper?", "answers": [str(n)],
         "answer_prefix": "The secret number of the lighthouse keeper is", "max_new_tokens": 8}
        for n in (5831, 2764)
    ]  # fmt: skip
    data = tmp_path / "needles.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = kvs.load_model()
    config = BenchConfig(methods=("none", "knorm"), ratios=(0.25,), datasets=(str(data),))
    run = run_bench(model, tokenizer, config, tmp_path / "out", model_name="smollm2", progress=False)
    assert run.computed_rows == 4 and run.prefills == 1 and run.cost_passes == 2
    results = read_jsonl(tmp_path / "out" / RESULTS)
    assert all(r["score"] == 1.0 for r in results if r["method"] == "none")  # the uncompressed model finds them
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in results if r["method"] != "none")
    files = write_report(tmp_path / "out")
    assert "| none | 100.0 [34.2, 100.0] |" in files.markdown.read_text()  # 2 of 2 right: Wilson [2 / (2 + z²), 1]

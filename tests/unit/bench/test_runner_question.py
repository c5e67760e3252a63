"""Methods that need the question (FINCH) run query-aware in the benchmark even without `query_aware=True`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.bench.results import RESULTS, read_jsonl
from kvsqueeze.bench.runner import BenchConfig, run_bench
from kvsqueeze.methods.finch import Finch
from kvsqueeze.pipeline import generate_encoded
from kvsqueeze.prompts import encode_query_aware, question_token_count
from tests.tiny import tiny_model, tiny_tokenizer
from tests.unit.bench.runner_fakes import FakeTask


def test_finch_compresses_each_question_with_its_context(fakes, tmp_path: Path) -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    options = {"finch": {"chunk_size": 8}}
    config = BenchConfig(methods=("none", "finch"), ratios=(0.5,), tasks=("fake",), lengths=(48,), samples=2,
                         options=options)  # fmt: skip
    run = run_bench(model, tok, config, tmp_path, progress=False)
    rows = read_jsonl(tmp_path / RESULTS)
    finch = [r for r in rows if r["method_name"] == "finch"]
    none = [r for r in rows if r["method_name"] == "none"]
    assert run.computed_rows == len(rows) == 8
    assert len(finch) == len(none) == 4
    assert not any(r["query_aware"] for r in none) and all(r["query_aware"] for r in finch)
    agnostic = {n["sample"]: n["context_tokens"] for n in none}
    assert all(f["context_tokens"] > agnostic[f["sample"]] for f in finch)  # the question is inside
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in finch)
    # each prediction is what a direct query-aware run gives when FINCH is told the question's length
    for sample in FakeTask().samples(tok, 48, 2):
        for qi, question in enumerate(sample.questions):
            ids, text = encode_query_aware(tok, sample.context, question, sample.answer_prefix)
            n = question_token_count(tok, sample.context, question, sample.answer_prefix)
            method = Finch(ratio=0.5, chunk_size=8, question_tokens=n)
            direct = generate_encoded(model, tok, [ids], [text], [0], method, sample.max_new_tokens)
            [row] = [r for r in finch if r["sample"] == sample.index and r["question_index"] == qi]
            assert row["prediction"] == direct.answers[0]


@pytest.mark.parametrize("template", [True, False])
def test_question_token_count_covers_the_question(template: bool) -> None:
    tok = tiny_tokenizer(chat_template=template)
    context, question = "The harbour was quiet. The code is 4417.", "What is the code?"
    ids, _ = encode_query_aware(tok, context, question)
    n = question_token_count(tok, context, question)
    assert tok.decode(ids[-n:]).strip().endswith(question)
    assert question not in tok.decode(ids[:-n])
    assert n < len(ids) // 2

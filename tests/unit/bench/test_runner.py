"""The benchmark runner on a tiny model: rows and their fields, the shared prefill, resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvsqueeze.bench.results import COSTS, RESULTS, read_jsonl, row_key
from kvsqueeze.bench.runner import BenchConfig, default_config, run_bench
from kvsqueeze.bench.statistics import mcnemar_power
from kvsqueeze.bench.tasks import get_task
from kvsqueeze.methods import list_methods
from kvsqueeze.pipeline import generate
from tests.unit.bench.runner_fakes import FakeTask, Interrupt

FIELDS = ["task", "context_length", "method", "ratio", "question", "answers", "prediction", "score", "prefill_seconds",
          "compression_seconds", "decode_tokens_per_second", "kv_bytes_before", "kv_bytes_after",
          "peak_memory_bytes", "model", "seed", "versions"]  # fmt: skip


def _config(**kw) -> BenchConfig:
    base = {"methods": ("none", "knorm"), "ratios": (0.5,), "tasks": ("fake",), "lengths": (48,), "samples": 2}
    return BenchConfig(**{**base, **kw})


def _rows(out: Path) -> list[dict]:
    return read_jsonl(out / RESULTS)


def test_grid_writes_every_row_with_its_fields(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run = run_bench(model, tok, _config(ratios=(0.25, 0.5)), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert len(rows) == 2 * 2 * 3 == run.computed_rows  # samples x questions x (none + knorm at 2 ratios)
    assert run.cost_passes == 3 and run.prefills == 1  # sample 0 runs the cost passes, sample 1 the shared prefill
    for row in rows:
        assert all(f in row for f in FIELDS), set(FIELDS) - set(row)
        assert set(row["versions"]) == {"kvsqueeze", "torch", "transformers"}
        assert 0.0 <= row["score"] <= 1.0 and row["prefill_seconds"] > 0 and row["peak_memory_bytes"] >= 0
    knorm = [r for r in rows if r["method"].startswith("KNorm")]
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in knorm)
    assert all(r["kv_bytes_after"] == r["kv_bytes_before"] for r in rows if r["method"] == "none")
    assert {r["ratio"] for r in rows} == {0.0, 0.25, 0.5}
    assert len(read_jsonl(tmp_path / COSTS)) == 3
    assert json.loads((tmp_path / "config.json").read_text())["config"]["tasks"] == ["fake"]


def test_shared_prefill_answers_like_generate(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(methods=("knorm",)), tmp_path, progress=False)
    sample = FakeTask().samples(tok, 48, 2)[1]  # the sample answered from the shared prefill
    expected = generate(model, tok, sample.context, list(sample.questions), method=_config().cells()[1][1],
                        max_new_tokens=sample.max_new_tokens).answers  # fmt: skip
    got = [r["prediction"] for r in sorted(_rows(tmp_path), key=lambda r: r["question_index"]) if r["sample"] == 1]
    assert got == expected


def test_rerun_skips_finished_rows_and_fills_deleted_ones(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(), tmp_path, progress=False)
    first = _rows(tmp_path)
    again = run_bench(model, tok, _config(), tmp_path, progress=False)
    assert again.computed_rows == 0 and again.skipped_rows == len(first) and again.prefills == again.cost_passes == 0
    kept = [r for r in first if not (r["sample"] == 1 and r["method"] != "none")]
    (tmp_path / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = run_bench(model, tok, _config(), tmp_path, progress=False)
    assert resumed.computed_rows == len(first) - len(kept) == 2
    assert resumed.cost_passes == 0  # the cost figures were kept in costs.jsonl
    final = _rows(tmp_path)
    assert sorted(map(row_key, final)) == sorted(map(row_key, first))
    by_key = {row_key(r): r["prediction"] for r in first}
    assert all(by_key[row_key(r)] == r["prediction"] for r in final)


def test_interrupted_run_loses_nothing(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    config = _config(methods=("none", "fake_interrupt"), samples=3)
    Interrupt.after = 4 * 3  # 4 layers: the method's warm-up, samples 0 and 1; sample 2 raises KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_bench(model, tok, config, tmp_path, progress=False)
    partial = _rows(tmp_path)
    assert len(partial) == 10  # all but the interrupted cell (2 questions)
    assert all(json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines())  # no torn line
    Interrupt.after = None
    resumed = run_bench(model, tok, config, tmp_path, progress=False)
    assert resumed.computed_rows == 12 - len(partial) and resumed.skipped_rows == len(partial)
    keys = [row_key(r) for r in _rows(tmp_path)]
    assert len(keys) == len(set(keys)) == 12


def test_a_torn_last_line_is_recomputed(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    config = _config(methods=("none",), samples=1)
    run_bench(model, tok, config, tmp_path, progress=False)
    text = (tmp_path / RESULTS).read_text()
    (tmp_path / RESULTS).write_text(text[: len(text) - 20])  # a hard kill in the middle of the last row
    run = run_bench(model, tok, config, tmp_path, progress=False)
    assert run.computed_rows == 1
    assert len(_rows(tmp_path)) == 2


def test_methods_without_shared_prefill_run_for_real(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run = run_bench(model, tok, _config(methods=("fake_chunked",)), tmp_path, progress=False)
    assert run.prefills == 0 and run.cost_passes == 1 and run.computed_rows == 4
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in _rows(tmp_path))


def test_budget_policy_wraps_every_method_and_labels_its_rows(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(budget_policy="adakv"), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert {r["method_name"] for r in rows} == {"none", "adakv(knorm)"}
    adakv = [r for r in rows if r["method_name"] == "adakv(knorm)"]
    assert all(r["method"].startswith("AdaKV(") and "KNorm" in r["method"] for r in adakv)
    assert all(r["kv_bytes_after"] < r["kv_bytes_before"] for r in adakv)


def test_chunked_prefill_and_decoding_compression_run_in_the_forward(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run = run_bench(model, tok, _config(chunk_size=16, decode_target=20, decode_every=4), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert run.prefills == 1  # only the uncompressed 'none' cell uses the shared prefill
    knorm = [r for r in rows if r["method_name"] == "knorm"]
    assert len(knorm) == 4 and all(r["chunk_size"] == 16 and r["decode_target"] == 20 for r in knorm)
    assert all("chunk_size" not in r for r in rows if r["method_name"] == "none")
    # the rows are those of generate with the same settings
    one_shot = tmp_path / "one-shot"
    run_bench(model, tok, _config(methods=("knorm",)), one_shot, progress=False)
    assert {row_key(r) for r in _rows(one_shot)}.isdisjoint({row_key(r) for r in knorm})  # distinct runs, own keys


def test_query_aware_compresses_each_question_with_the_context(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run = run_bench(model, tok, _config(methods=("knorm",), query_aware=True), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert run.prefills == 3  # one unit per question: 4 units, the first is the cost pass
    assert len(rows) == 4 and all(r["query_aware"] for r in rows)
    assert all(r["context_tokens"] > 48 for r in rows)


def test_a_dataset_joins_the_grid(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    data = tmp_path / "mine.jsonl"
    ctx = "The harbour was quiet. The code is 4417. Gulls circled over the market."
    lines = [{"context": ctx, "question": "What is the code?", "answers": ["4417"]},
             {"context": ctx, "question": "What circled?", "answers": ["gulls"], "max_new_tokens": 3}]  # fmt: skip
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    config = BenchConfig(methods=("none", "knorm"), ratios=(0.5,), datasets=(str(data),))
    run_bench(model, tok, config, tmp_path / "out", progress=False)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4 and {r["task"] for r in rows} == {"mine"}
    assert all(r["context_length"] == r["context_tokens"] > 10 for r in rows)
    assert {r["sample_meta"]["lines"][r["question_index"]] for r in rows} == {1, 2}  # where each row came from


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"methods": ("knrm",)}, "Did you mean 'knorm'"),
        ({"tasks": ("fak",)}, "Unknown task"),
        ({"ratios": (1.0,)}, r"ratio must be a number in \[0, 1\)"),
        ({"lengths": (0,)}, "context length must be an integer >= 1"),
        ({"samples": 0}, "samples must be an integer >= 1, got 0"),
        ({"samples": "4"}, "samples must be an integer >= 1, got .4."),
        ({"max_new_tokens": float("inf")}, "max_new_tokens must be an integer >= 1 or None, got inf"),
        ({"options": {"snapkv": {"window": 8}}}, "not among the methods"),
        ({"options": {"knorm": {"windw": 8}}}, "Unknown option 'windw'"),
        ({"tasks": (), "lengths": ()}, "at least one task"),
        ({"budget_policy": "adakvv"}, "unknown budget policy 'adakvv'"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1 or None, got 0"),
        ({"decode_target": -3}, "decode_target must be an integer >= 1 or None, got -3"),
        ({"task_options": {"passkey": {"depth": 0.5}}}, r"task 'passkey', which is not among the tasks \['fake'\]"),
        (
            {"tasks": ("passkey_varied",), "task_options": {"passkey_varied": {"phrasing": "x"}}},
            "Unknown option 'phrasing' for task 'passkey_varied'. Did you mean 'phrasings'",
        ),
        (
            {"tasks": ("passkey_varied",), "task_options": {"passkey_varied": {"phrasings": "pass_key,nope"}}},
            "phrasings must be one of",
        ),
    ],
)
def test_bad_configs_fail_before_running(fakes, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_task_options_choose_the_samples_and_are_kept_as_the_task_holds_them(llama, tmp_path: Path) -> None:
    model, tok = llama
    grid = {"methods": ("none",), "ratios": (), "tasks": ("passkey_varied",), "lengths": (80,), "samples": 4}
    config = BenchConfig(**grid, task_options={"passkey_varied": {"phrasings": "pass_key, magic_number"}})
    assert config.task_options == {"passkey_varied": {"phrasings": ["pass_key", "magic_number"]}}
    as_tuple = BenchConfig(**grid, task_options={"passkey_varied": {"phrasings": ("pass_key", "magic_number")}})
    assert as_tuple == config  # one run however the options were written
    run_bench(model, tok, config, tmp_path, progress=False)
    assert sorted(r["sample_meta"]["phrasing"] for r in _rows(tmp_path)) == ["magic_number"] * 2 + ["pass_key"] * 2


def test_too_long_contexts_are_refused_up_front(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    with pytest.raises(ValueError, match=r"fake sample 0 .*maximum of 1024"):
        run_bench(model, tok, _config(lengths=(1100,), samples=1), tmp_path, progress=False)
    assert not (tmp_path / RESULTS).exists() or not _rows(tmp_path)


def test_default_config_keeps_registered_names(fakes) -> None:
    config = default_config(tasks=("fake",))
    assert config.methods[0] == "none" and "knorm" in config.methods
    assert config.ratios == (0.25, 0.5, 0.75) and config.name == "default"


def test_full_suite_holds_every_registered_method(fakes) -> None:
    config = default_config("full", tasks=("fake",))
    assert config.methods == ("none", *list_methods()) and config.name == "full"
    assert config.options["think"] == {"scorer": "snapkv"}  # the suite's own options for a method that needs them
    mine = default_config("full", tasks=("fake",), methods=("knorm",), options={"knorm": {}})
    assert mine.options == {"knorm": {}}  # suite options of methods left out of the grid are dropped
    with pytest.raises(ValueError, match="unknown suite 'ful'; known: default, full"):
        default_config("ful")


def test_rank_suite_can_find_a_15_point_difference(fakes, llama) -> None:
    config = default_config("rank")
    assert config.name == "rank" and config.methods[0] == "none" and config.ratios == (0.25, 0.5, 0.75)
    assert {"knorm", "expected_attention", "qfilters", "tova", "lukv"} <= set(config.methods)
    assert config.tasks == ("passkey_varied", "niah_varied") and config.lengths == (1024, 2048)
    per_sample = {len(get_task(t).samples(llama[1], 64, 1)[0].questions) for t in config.tasks}
    questions = len(config.tasks) * len(config.lengths) * config.samples * per_sample.pop()
    assert questions == 96 and config.samples % 12 == 0  # each source, phrasing and format equally often
    assert mcnemar_power(questions, 0.15, 0.0) > 0.99 and mcnemar_power(questions, 0.20, 0.05) > 0.8


def test_peak_memory_sees_a_large_allocation() -> None:
    from kvsqueeze.bench.memory import PeakMemory

    with PeakMemory() as small:
        pass
    with PeakMemory() as big:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert big.peak_bytes >= 48 * 2**20 > small.peak_bytes

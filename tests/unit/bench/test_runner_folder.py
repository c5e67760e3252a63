"""The runner and its results folder: a rerun with other settings is refused before any work (or written next to
it), an edited dataset row is computed again alone, damaged files name their line, a cut cost line is recomputed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from kvsqueeze.bench.results import COSTS, RESULTS, SUPERSEDED, read_jsonl
from kvsqueeze.bench.runner import BenchConfig, run_bench


def _config(**kw) -> BenchConfig:
    base = {"methods": ("none", "knorm"), "ratios": (0.5,), "tasks": ("fake",), "lengths": (48,), "samples": 1}
    return BenchConfig(**{**base, **kw})


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "bench.lock"}


def test_other_settings_are_refused_before_any_work(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(), tmp_path, progress=False)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)holds rows of another run.*max_new_tokens: None -> 3"):
        run_bench(model, tok, _config(max_new_tokens=3), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"(?s)chunk_size: None -> 16\n  query_aware: False -> True"):
        run_bench(model, tok, _config(query_aware=True, chunk_size=16), tmp_path, progress=False)
    assert _files(tmp_path) == before  # config.json, results and costs as they were


def test_another_dtype_is_refused_or_written_next_to_it(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    first = run_bench(model, tok, _config(), tmp_path / "out", progress=False)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype: 'float32' -> 'bfloat16'"):
        run_bench(half, tok, _config(), tmp_path / "out", progress=False)
    second = run_bench(half, tok, _config(), tmp_path / "out", progress=False, new_run=True)
    assert second.out_dir == tmp_path / "out-2" and second.computed_rows == first.computed_rows == 4
    again = run_bench(half, tok, _config(), tmp_path / "out", progress=False, new_run=True)
    assert again.out_dir == tmp_path / "out-2" and again.computed_rows == 0 and again.skipped_rows == 4
    assert {r["run"] for r in read_jsonl(tmp_path / "out" / RESULTS)} == {first.run_id} != {second.run_id}
    config = json.loads((tmp_path / "out-2" / "config.json").read_text())
    assert config["run"] == second.run_id and config["identity"]["dtype"] == "bfloat16"


def test_the_grid_grows_in_the_same_folder(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(methods=("none",)), tmp_path, progress=False)
    run = run_bench(model, tok, _config(samples=2), tmp_path, progress=False)
    assert run.skipped_rows == 2 and run.computed_rows == 2 * 2 + 2  # knorm on both samples, none on the new one


def _dataset(path: Path, answer: str) -> Path:
    ctx = "The harbour was quiet. The code is 4417. Gulls circled over the market."
    rows = [{"context": ctx, "question": "What is the code?", "answers": ["4417"]},
            {"context": ctx, "question": "What circled?", "answers": [answer]},
            {"context": "A farmer sold apples.", "question": "What was sold?", "answers": ["apples"]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_edited_dataset_row_is_computed_again_alone(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    data = _dataset(tmp_path / "mine.jsonl", "gulls")
    config = BenchConfig(methods=("none", "knorm"), ratios=(0.5,), datasets=(str(data),))
    run_bench(model, tok, config, tmp_path / "out", progress=False)
    _dataset(data, "seagulls")
    run = run_bench(model, tok, config, tmp_path / "out", progress=False)
    assert run.computed_rows == 2 and run.skipped_rows == 4 and run.superseded_rows == 2  # none and knorm
    rows = read_jsonl(tmp_path / "out" / RESULTS)
    assert len(rows) == 6 and sorted(r["answers"][0] for r in rows if r["question"] == "What circled?") == [
        "seagulls",
        "seagulls",
    ]
    old = read_jsonl(tmp_path / "out" / SUPERSEDED)
    assert [r["answers"] for r in old] == [["gulls"], ["gulls"]]
    assert run_bench(model, tok, config, tmp_path / "out", progress=False).computed_rows == 0


def test_a_row_inserted_into_a_dataset_is_the_only_one_computed(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    data = _dataset(tmp_path / "mine.jsonl", "gulls")
    config = BenchConfig(methods=("none",), ratios=(), datasets=(str(data),))
    run_bench(model, tok, config, tmp_path / "out", progress=False)
    new = {"context": "The mill stood by the river.", "question": "What stood by the river?", "answers": ["mill"]}
    data.write_text(json.dumps(new) + "\n" + data.read_text())  # every other question moves down a line and sample
    run = run_bench(model, tok, config, tmp_path / "out", progress=False)
    assert run.computed_rows == 1 and run.skipped_rows == 3 and run.superseded_rows == 0
    assert len(read_jsonl(tmp_path / "out" / RESULTS)) == 4


@pytest.mark.parametrize(("name", "field"), [(RESULTS, "run"), (COSTS, "run")])
def test_an_empty_row_names_the_file_and_line(fakes, llama, tmp_path: Path, name: str, field: str) -> None:
    model, tok = llama
    run_bench(model, tok, _config(), tmp_path, progress=False)
    lines = len((tmp_path / name).read_text().splitlines())
    with (tmp_path / name).open("a") as f:
        f.write("{}\n")
    with pytest.raises(ValueError, match=rf"{name}: line {lines + 1}: not a row of this file: field '{field}'"):
        run_bench(model, tok, _config(), tmp_path, progress=False)


def test_a_cut_cost_line_is_computed_again(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    first = run_bench(model, tok, _config(), tmp_path, progress=False)
    costs = (tmp_path / COSTS).read_text()
    (tmp_path / COSTS).write_text(costs[: len(costs) - 20])  # a hard kill in the middle of the last cost row
    run = run_bench(model, tok, _config(), tmp_path, progress=False)
    assert run.cost_passes == 1 and run.computed_rows == 0 and first.cost_passes == 2
    lines = (tmp_path / COSTS).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["run"] == first.run_id for line in lines)
    assert run_bench(model, tok, _config(), tmp_path, progress=False).cost_passes == 0


def test_a_cut_result_line_leaves_no_damage_behind(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(), tmp_path, progress=False)
    text = (tmp_path / RESULTS).read_text()
    (tmp_path / RESULTS).write_text(text[: len(text) - 20])
    assert run_bench(model, tok, _config(), tmp_path, progress=False).computed_rows == 1
    lines = (tmp_path / RESULTS).read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the cut line is gone, not left mid-file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"context": "x y", "question": "q", "answers": ["a"], "max_new_tokens": Infinity}', "max_new_tokens"),
        ('{"context": "x y", "question": "q", "answers": ["a"], "max_new_tokens": 1e400}', "max_new_tokens"),
        ("{}", r"line 1: field 'context': missing"),
        (b'{"context": "caf\xe9", "question": "q", "answers": ["a"]}', r"bad\.jsonl: line 1: not UTF-8"),
        (None, "is a folder"),
    ],
)
def test_a_bad_dataset_fails_before_the_folder_is_touched(
    fakes, llama, tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    model, tok = llama
    data = tmp_path / "bad.jsonl"
    if content is None:
        data.mkdir()
    else:
        data.write_bytes(content if isinstance(content, bytes) else content.encode() + b"\n")
    with pytest.raises(ValueError, match=message):
        config = BenchConfig(methods=("none",), ratios=(), datasets=(str(data),))
        run_bench(model, tok, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

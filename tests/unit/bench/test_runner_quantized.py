"""The benchmark's quantization axis on a tiny model: every cell at each bits value, bytes that fall with the bits,
the shared prefill quantized after compression (as a real quantized run), resume across bits, keys that keep bits
and group settings apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench.results import COSTS, RESULTS, read_jsonl, row_key
from kvsqueeze.bench.runner import BenchConfig, run_bench
from kvsqueeze.pipeline import generate
from tests.unit.bench.runner_fakes import FakeTask

# the fake task's prompts hold ~60 tokens: groups of 8 and a residual of 8 leave most of them quantized
QUANT = {"kv_group_size": 8, "kv_residual": 8}


def _config(**kw) -> BenchConfig:
    base = {"methods": ("none", "knorm"), "ratios": (0.5,), "tasks": ("fake",), "lengths": (48,), "samples": 2,
            "kv_bits": (None, 8, 4, 2), **QUANT}  # fmt: skip
    return BenchConfig(**{**base, **kw})


def _rows(out: Path) -> list[dict]:
    return read_jsonl(out / RESULTS)


def test_every_cell_runs_at_each_bits_value_and_bytes_fall_with_the_bits(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run = run_bench(model, tok, _config(), tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert len(rows) == run.computed_rows == 2 * 2 * 2 * 4  # samples x questions x (none, knorm) x bits
    assert run.prefills == 1 and run.cost_passes == 2 * 4  # one recording serves every bits value
    for name in ("none", "knorm"):
        mine = [r for r in rows if r["method_name"] == name]
        assert sorted({r["kv_bits"] for r in mine}, key=lambda b: b or 99) == [2, 4, 8, None]
        for sample in (0, 1):
            by_bits = {r["kv_bits"]: r for r in mine if r["sample"] == sample}
            after = [by_bits[b]["kv_bytes_after"] for b in (None, 8, 4, 2)]
            assert after == sorted(after, reverse=True) and len(set(after)) == 4, after
            assert len({r["kv_bytes_before"] for r in by_bits.values()}) == 1  # the full-precision context
    for row in rows:
        quantized = row["kv_bits"] is not None
        assert (row.get("kv_group_size"), row.get("kv_residual")) == ((8, 8) if quantized else (None, None))
    costs = read_jsonl(tmp_path / COSTS)
    assert sorted((c["kv_bits"] or 99) for c in costs) == [2, 2, 4, 4, 8, 8, 99, 99]


def test_the_shared_prefill_quantized_after_compression_answers_like_generate(fakes, llama, tmp_path: Path) -> None:
    """Sample 1 comes from a compressed copy of the full-precision recording, quantized after: the same answers and
    bytes as a real quantized run (generate with kv_bits), where the method scored the tokens before quantization."""
    model, tok = llama
    run_bench(model, tok, _config(methods=("knorm",), kv_bits=(4,)), tmp_path, progress=False)
    sample = FakeTask().samples(tok, 48, 2)[1]
    method = _config().cells()[1][1]
    real = generate(model, tok, sample.context, list(sample.questions), method=method, kv_bits=4,
                    max_new_tokens=sample.max_new_tokens, **QUANT)  # fmt: skip
    got = sorted((r for r in _rows(tmp_path) if r["sample"] == 1), key=lambda r: r["question_index"])
    assert [r["prediction"] for r in got] == real.answers
    assert {r["kv_bytes_after"] for r in got} == {real.stats.kv_bytes_after}
    assert real.stats.kv_bits == 4


def test_chunked_and_decoding_cells_build_a_quantized_cache(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    config = _config(kv_bits=(None, 4), chunk_size=16, decode_target=20, decode_every=4)
    run = run_bench(model, tok, config, tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert run.prefills == 1  # only 'none' (at both bits) uses the shared prefill; knorm runs in the forward
    knorm = {(r["sample"], r["question_index"], r["kv_bits"]): r for r in rows if r["method_name"] == "knorm"}
    assert len(knorm) == 8 and all(r["chunk_size"] == 16 for r in knorm.values())
    for (sample, q, bits), row in knorm.items():
        if bits == 4:
            assert row["kv_bytes_after"] < knorm[(sample, q, None)]["kv_bytes_after"]


def test_resume_across_bits_computes_only_the_new_bits(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    first = run_bench(model, tok, _config(kv_bits=(None,)), tmp_path, progress=False)
    assert first.computed_rows == 8
    more = run_bench(model, tok, _config(kv_bits=(16, 4)), tmp_path, progress=False)  # 16 = full precision
    assert more.skipped_rows == 8 and more.computed_rows == 8 and more.prefills == 1
    assert sorted(r["kv_bits"] or 0 for r in _rows(tmp_path)) == [0] * 8 + [4] * 8
    again = run_bench(model, tok, _config(kv_bits=(4, None)), tmp_path, progress=False)
    assert again.computed_rows == 0 and again.skipped_rows == 16 and again.cost_passes == 0


def test_a_folder_written_before_the_axis_resumes_as_full_precision(fakes, llama, tmp_path: Path) -> None:
    """Rows and cost rows without the kv_bits field (an older kvsqueeze) are the full-precision rows."""
    model, tok = llama
    run_bench(model, tok, _config(kv_bits=(None,)), tmp_path, progress=False)
    for name in (RESULTS, COSTS):
        old = [{k: v for k, v in r.items() if k != "kv_bits"} for r in read_jsonl(tmp_path / name)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in old))
    again = run_bench(model, tok, _config(kv_bits=(None, 2)), tmp_path, progress=False)
    assert again.skipped_rows == 8 and again.computed_rows == 8 and again.cost_passes == 2


def test_rows_at_other_bits_or_group_settings_are_never_taken_for_each_other(fakes, llama, tmp_path: Path) -> None:
    model, tok = llama
    run_bench(model, tok, _config(methods=("knorm",), kv_bits=(4,)), tmp_path, progress=False)
    other_bits = run_bench(model, tok, _config(methods=("knorm",), kv_bits=(2,)), tmp_path, progress=False)
    other_group = run_bench(model, tok, _config(methods=("knorm",), kv_bits=(4,), kv_group_size=16), tmp_path,
                            progress=False)  # fmt: skip
    assert other_bits.skipped_rows == other_group.skipped_rows == 0
    assert other_bits.computed_rows == other_group.computed_rows == 4
    keys = [row_key(r) for r in _rows(tmp_path)]
    assert len(keys) == len(set(keys)) == 12


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"kv_bits": (3,)}, "kv_bits must be one of 2, 4, 8, got 3"),
        ({"kv_bits": (4, "8")}, "kv_bits must be an integer"),
        ({"kv_bits": ()}, "kv_bits needs at least one value"),
        ({"kv_group_size": 0}, "kv_group_size must be an integer >= 1"),
        ({"kv_residual": -1}, "kv_residual must be an integer >= 0"),
    ],
)
def test_bad_bits_settings_fail_before_running(fakes, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_sixteen_and_thirty_two_bits_mean_full_precision(fakes) -> None:
    assert _config(kv_bits=(16, 4, None, 32, 4)).kv_bits == (None, 4)

"""`kvsqueeze bench` and `kvsqueeze report`: a tiny grid end to end, the table on stdout, bad values exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsqueeze.bench.results import RESULTS
from kvsqueeze.cli import main
from tests.unit.bench.runner_fakes import Interrupt, register_fakes


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    register_fakes(monkeypatch)


def _bench(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--model", str(model_dir), "--tasks", "fake", "--lengths", "40", "--samples", "1",
            "--ratios", "0.5", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_bench_runs_prints_the_table_and_writes_the_report(model_dir: Path, tmp_path: Path, capsys, caplog) -> None:
    caplog.set_level("INFO", logger="kvsqueeze")
    out = tmp_path / "run"
    assert main(_bench(model_dir, out, "--methods", "none,knorm", "--option", "knorm.ratio=0.5")) == 2
    assert "ratio" in capsys.readouterr().err  # ratio comes from --ratios, not from an option
    assert main(_bench(model_dir, out, "--methods", "none,knorm")) == 0
    captured = capsys.readouterr()
    assert "| method | 0 | 0.5 |" in captured.out and "| knorm |" in captured.out
    assert "Report:" in caplog.text
    for name in ("results.jsonl", "costs.jsonl", "config.json", "report.md", "report.html", "score_vs_ratio.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert len(rows) == 4 and {r["model"] for r in rows} == {str(model_dir)}
    assert main(_bench(model_dir, out, "--methods", "none,knorm")) == 0  # rerun: everything is skipped
    assert "0 rows computed, 4 already there" in caplog.text
    assert main(["report", str(out)]) == 0
    assert "| knorm |" in capsys.readouterr().out


def test_bench_takes_the_forward_options_of_generate(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["--methods", "knorm", "--budget-policy", "adakv", "--chunk-size", "16", "--decode-target", "24"]
    assert main(_bench(model_dir, out, *args)) == 0
    assert "| adakv(knorm) |" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert rows and all(r["chunk_size"] == 16 and r["decode_target"] == 24 and r["decode_every"] == 32 for r in rows)


def test_ctrl_c_exits_130_and_says_how_to_resume(model_dir: Path, tmp_path: Path, capsys) -> None:
    Interrupt.after = 0
    assert main(_bench(model_dir, tmp_path, "--methods", "none,fake_interrupt")) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len((tmp_path / RESULTS).read_text().splitlines()) == 2  # the 'none' rows were kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "knorm,snapkvv"], "Did you mean 'snapkv'"),
        (["--tasks", "nope"], "Unknown task 'nope'"),
        (["--ratios", "0.5,1.2"], "ratio must be in [0, 1)"),
        (["--lengths", "1024,0"], "context lengths must be integers >= 1"),
        (["--samples", "0"], "expected a positive integer"),
        (["--dataset", "missing.jsonl"], "does not exist"),
        (["--option", "window=8"], "METHOD.KEY=VALUE"),
        (["--budget-policy", "adakvv"], "invalid choice: 'adakvv'"),
        (["--chunk-size", "0"], "expected a positive integer"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse errors
        code = main(["bench", "--tasks", "fake", "--lengths", "40", *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_report_of_a_directory_without_results_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "kvsqueeze bench --out" in capsys.readouterr().err

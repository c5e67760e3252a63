"""`kvsqueeze bench` and `kvsqueeze report`: a tiny grid end to end, the table on stdout, bad values exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvsqueeze.bench.results import RESULTS
from kvsqueeze.cli import main
from tests.cli.run_cli import SRC
from tests.unit.bench.report_rows import write_results
from tests.unit.bench.runner_fakes import Interrupt

pytestmark = pytest.mark.usefixtures("fakes")


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
        (
            ["--kv-bits", "16,four"],
            "argument --kv-bits: bits must be 2, 4, 8, or 16/none for full precision; got 'four'",
        ),
        (["--kv-bits", "4,3"], "kv_bits must be one of 2, 4, 8, got 3"),
        (["--kv-bits", "4", "--kv-group-size", "0"], "kv_group_size must be an integer >= 1"),
        (["--task-option", "passkey_varied:phrasings=pass_key"], "TASK.KEY=VALUE (e.g. passkey_varied.phrasings="),
        (["--task-option", "passkey.depth=0.5"], "task 'passkey', which is not among the tasks ['fake']"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse errors
        code = main(["bench", "--tasks", "fake", "--lengths", "40", *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_kv_bits_fail_before_the_model_loads(tmp_path: Path, capsys) -> None:
    args = ["bench", "--model", str(tmp_path / "no-model"), "--tasks", "fake", "--lengths", "40", "--kv-bits", "8,5"]
    assert main(args) == 2  # the bits' error, not the missing model's: the model was never loaded
    assert "kv_bits must be one of 2, 4, 8, got 5" in capsys.readouterr().err


def test_kv_bits_add_quantized_rows_to_the_folder_of_the_same_command(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """--kv-bits is an axis of the grid: the default results folder stays that of the command without it, so the
    full-precision rows are kept and only the quantized ones are computed; the report labels them none@4bit."""
    monkeypatch.chdir(tmp_path)
    base = ["bench", "--model", str(model_dir), "--tasks", "fake", "--lengths", "40", "--samples", "1", "--methods",
            "none", "--no-progress"]  # fmt: skip
    assert main(base) == 0
    assert main([*base, "--kv-bits", "16,4", "--kv-group-size", "8", "--kv-residual", "8"]) == 0
    (out,) = (tmp_path / "results" / "bench").iterdir()
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [(r["kv_bits"], r.get("kv_group_size")) for r in rows] == [(None, None)] * 2 + [(4, 8)] * 2  # 2 questions
    assert rows[2]["kv_bytes_after"] < rows[0]["kv_bytes_after"]
    printed = capsys.readouterr().out
    assert "| none@4bit |" in printed
    assert "Frontier" in (out / "report.md").read_text() and (out / "score_vs_kv_mib.png").is_file()


def test_report_of_a_directory_without_results_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "kvsqueeze bench --out" in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_before_the_model_loads(
    model_dir: Path, tmp_path: Path, capsys, caplog
) -> None:
    caplog.set_level("INFO", logger="kvsqueeze")
    out = tmp_path / "run"
    assert main(_bench(model_dir, out, "--methods", "none")) == 0
    config = (out / "config.json").read_bytes()
    caplog.clear()
    capsys.readouterr()
    assert main(_bench(model_dir, out, "--methods", "none", "--max-new-tokens", "3", "--dtype", "bfloat16")) == 2
    err = capsys.readouterr().err
    assert f"results folder '{out}' holds rows of another run" in err
    assert "dtype: 'float32' -> 'bfloat16'" in err and "max_new_tokens: None -> 3" in err and "--new-run" in err
    assert "Loading model" not in caplog.text and (out / "config.json").read_bytes() == config
    assert main(_bench(model_dir, out, "--methods", "none", "--dtype", "bfloat16", "--new-run")) == 0
    assert (tmp_path / "run-2" / "report.md").is_file() and (out / "config.json").read_bytes() == config
    assert "holds another run: writing into" in caplog.text


def test_task_options_choose_the_samples_and_another_choice_is_another_run(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    argv = ["bench", "--model", str(model_dir), "--tasks", "passkey_varied", "--lengths", "80", "--samples", "2",
            "--methods", "none", "--out", str(out), "--no-progress", "-q"]  # fmt: skip
    assert main([*argv, "--task-option", "passkey_varied.phrasings=access_code,pass_key"]) == 0
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert sorted(r["sample_meta"]["phrasing"] for r in rows) == ["access_code", "pass_key"]
    capsys.readouterr()
    assert main([*argv, "--task-option", "passkey_varied.phrasings=magic_number"]) == 2
    err = capsys.readouterr().err
    assert "holds rows of another run" in err
    assert "task_options: {'passkey_varied': {'phrasings': ['access_code', 'pass_key']}} -> {" in err
    assert main([*argv, "--task-option", 'passkey_varied.phrasings=["access_code", "pass_key"]']) == 0  # the same run


def test_bench_help_says_how_a_folder_is_shared(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--new-run" in text and "OUT-2" in text and "is refused, saying what differs" in text


def test_a_bad_dataset_fails_before_the_model_loads(tmp_path: Path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"context": "x y", "question": "q", "answers": ["a"], "max_new_tokens": Infinity}\n')
    args = ["bench", "--model", str(tmp_path / "no-model"), "--dataset", str(data), "--out", str(tmp_path / "out")]
    assert main(args) == 2  # the dataset's error, not the missing model's: the model was never loaded
    assert "bad.jsonl: line 1: field 'max_new_tokens': must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


_BENCH = """
import sys
from pathlib import Path
import pytest
from tests.unit.bench.runner_fakes import Gate, register_fakes
register_fakes(pytest.MonkeyPatch())
if sys.argv[1] != "-":
    Gate.entered, Gate.opened = Path(sys.argv[1]) / "entered", Path(sys.argv[1]) / "opened"
from kvsqueeze.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_bench_into_the_folder_stops_at_once(model_dir: Path, tmp_path: Path) -> None:
    """Two real `kvsqueeze bench` processes: the first waits mid-run (holding the folder), the second stops."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    argv = _bench(model_dir, out, "--methods", "none,fake_gate")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    first = subprocess.Popen([sys.executable, "-c", _BENCH, str(gate), *argv], cwd=SRC.parent, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (gate / "entered").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr and first.stderr.read()
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-c", _BENCH, "-", *argv], cwd=SRC.parent, env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"results folder '{out}' is in use by another kvsqueeze bench (process {first.pid})" in second.stderr
    finally:
        (gate / "opened").touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert len(rows) == 4 and len({(r["method"], r["question_index"]) for r in rows}) == 4  # each row once


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{}", "line 2: not a row of this file: field 'method' is missing"),
        ('{"method": "none", "task": "t", "context_length": 9, "ratio": "x"}', "line 2: not a row of this file"),
        ("[]", "line 2: expected a JSON object, got list"),
    ],
)
def test_report_names_a_malformed_row(tmp_path: Path, capsys, line: str, message: str) -> None:
    out = write_results(tmp_path)
    rows = (out / RESULTS).read_text().splitlines()
    (out / RESULTS).write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    assert main(["report", str(out)]) == 2
    assert f"{out / RESULTS}: {message}" in capsys.readouterr().err

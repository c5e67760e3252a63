"""A results folder holds one run: the identity check (what differs is said), --new-run's folder next to it, and
the lock that stops a second process (real processes, real flock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvsqueeze.bench.folder import (
    FolderBusyError,
    check_settings,
    identity_diff,
    identity_id,
    open_folder,
    run_identity,
    settings_identity,
)
from kvsqueeze.bench.results import CONFIG, LOCK, RESULTS, ResultsError
from kvsqueeze.bench.runner import BenchConfig
from tests.cli.run_cli import SRC
from tests.tiny import tiny_model, tiny_tokenizer

A = {"kvsqueeze": "0.1.0", "model": "m", "dtype": "float32", "max_new_tokens": None}
B = {**A, "dtype": "bfloat16", "max_new_tokens": 3}


def _open(folder: Path, identity: dict, new_run: bool = False) -> Path:
    """The folder open_folder picks (opened, locked, then released)."""
    with open_folder(folder, identity, new_run) as out:
        return out


def _claim(folder: Path, identity: dict) -> None:
    """Make `folder` hold a run of `identity` with one row."""
    with open_folder(folder, identity) as out:
        (out / CONFIG).write_text(json.dumps({"identity": identity}))
        (out / RESULTS).write_text('{"run": "x"}\n')


def test_identity_diff_says_old_and_new_of_each_field() -> None:
    assert identity_diff(A, B) == ["dtype: 'float32' -> 'bfloat16'", "max_new_tokens: None -> 3"]
    assert identity_diff(A, {**A, "device": "cpu"}) == ["device: '(not recorded)' -> 'cpu'"]
    assert identity_diff(A, dict(A)) == [] and identity_id(A) == identity_id(dict(reversed(A.items())))
    assert identity_id(A) != identity_id(B)


def test_a_folder_of_another_run_is_refused_with_what_differs(tmp_path: Path) -> None:
    _claim(tmp_path / "out", A)
    with pytest.raises(ResultsError, match=r"(?s)holds rows of another run.*dtype: 'float32' -> 'bfloat16'.*"
                                           r"max_new_tokens: None -> 3.*--new-run"):  # fmt: skip
        _open(tmp_path / "out", B)
    assert _open(tmp_path / "out", A) == tmp_path / "out"  # the same run resumes there


def test_new_run_writes_next_to_it_and_resumes_there(tmp_path: Path) -> None:
    _claim(tmp_path / "out", A)
    with open_folder(tmp_path / "out", B, new_run=True) as out:
        assert out == tmp_path / "out-2"
        (out / CONFIG).write_text(json.dumps({"identity": B}))
        (out / RESULTS).write_text('{"run": "x"}\n')
        with pytest.raises(FolderBusyError):  # held: even this process cannot open it twice
            _open(out, B)
    assert _open(tmp_path / "out", B, new_run=True) == tmp_path / "out-2"  # the same command again: this run's
    assert _open(tmp_path / "out", {**B, "model": "other"}, new_run=True) == tmp_path / "out-3"
    assert _open(tmp_path / "out", A, new_run=True) == tmp_path / "out"


def test_a_folder_without_rows_takes_any_run(tmp_path: Path) -> None:
    (tmp_path / CONFIG).write_text(json.dumps({"identity": A}))  # a run that failed before its first row
    assert _open(tmp_path, B) == tmp_path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "holds rows but no config.json"),
        ({"config": {}, "model": "m"}, "no run identity in its config.json"),
    ],
)
def test_rows_whose_settings_are_unknown_are_refused(tmp_path: Path, config: dict | None, message: str) -> None:
    (tmp_path / RESULTS).write_text('{"task": "fake"}\n')
    if config is not None:
        (tmp_path / CONFIG).write_text(json.dumps(config))
    with pytest.raises(ResultsError, match=message):
        _open(tmp_path, A)


@pytest.mark.parametrize(("text", "message"), [("{", "not valid JSON"), ("[1]", "expected a JSON object, got list")])
def test_a_damaged_config_is_named(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / RESULTS).write_text('{"task": "fake"}\n')
    (tmp_path / CONFIG).write_text(text)
    with pytest.raises(ResultsError, match=rf"config\.json: {message}"):
        _open(tmp_path, A)


def test_a_file_or_an_unwritable_place_is_no_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResultsError, match=r"results folder '.*file' is a file, not a folder"):
        _open(tmp_path / "file", A)
    with pytest.raises(ResultsError, match=r"cannot write into the results folder '.*file/out'"):
        _open(tmp_path / "file" / "out", A)


def test_check_settings_compares_only_what_it_knows(tmp_path: Path) -> None:
    _claim(tmp_path, {**A, "model_fingerprint": "abc"})
    check_settings(tmp_path, dict(A))  # the fingerprint is not known before the model loads: not compared
    with pytest.raises(ResultsError, match="dtype: 'float32' -> 'bfloat16'"):
        check_settings(tmp_path, B)


def test_run_identity_sees_dtype_attention_and_the_settings() -> None:
    model, tok = tiny_model("llama"), tiny_tokenizer()
    config = BenchConfig(methods=("none",), ratios=(), tasks=("passkey",), lengths=(64,))
    first = run_identity(model, tok, config, "tiny")
    assert first["dtype"] == "float32" and first["device"] == "cpu" and first["model"] == "tiny"
    assert first["chat_template"] is not None and len(first["model_fingerprint"]) == 24
    settings = settings_identity(config, "tiny", "float32", "sdpa")  # what the CLI checks before loading
    assert {k: first[k] for k in settings} == settings
    longer = BenchConfig(methods=("none",), ratios=(), tasks=("passkey",), lengths=(64,), max_new_tokens=3)
    assert identity_diff(first, run_identity(model, tok, longer, "tiny")) == ["max_new_tokens: None -> 3"]
    model.set_attn_implementation("eager")
    assert identity_diff(first, run_identity(model, tok, config, "tiny")) == ["attention: 'sdpa' -> 'eager'"]
    model.set_attn_implementation("sdpa")
    half = run_identity(model.to(torch.bfloat16), tok, config, "tiny")
    assert identity_diff(first, half) == ["dtype: 'float32' -> 'bfloat16'"]  # the fingerprint ignores the dtype
    model.model.layers[0].self_attn.q_proj.weight.data.mul_(2)  # other weights
    assert [d.split(":")[0] for d in identity_diff(half, run_identity(model, tok, config, "tiny"))] == [
        "model_fingerprint"
    ]


def test_task_options_enter_the_identity_only_when_given() -> None:
    grid = {"methods": ("none",), "ratios": (), "tasks": ("passkey_varied",), "lengths": (64,)}
    plain = settings_identity(BenchConfig(**grid), "tiny", "float32", "sdpa")
    assert "task_options" not in plain  # the identities of runs without task options are those they always had
    held_out = BenchConfig(**grid, task_options={"passkey_varied": {"phrasings": "access_code"}})
    other = BenchConfig(**grid, task_options={"passkey_varied": {"phrasings": ["pass_key"]}})
    first = settings_identity(held_out, "tiny", "float32", "sdpa")
    assert first["task_options"] == {"passkey_varied": {"phrasings": ["access_code"]}}
    assert json.loads(json.dumps(first)) == first  # stored in config.json and read back equal
    assert identity_diff(first, settings_identity(other, "tiny", "float32", "sdpa")) == [
        "task_options: {'passkey_varied': {'phrasings': ['access_code']}} -> {'passkey_varied': {'phrasings': "
        "['pass_key']}}"
    ]


_HOLDER = """
import sys
from pathlib import Path
from kvsqueeze.bench.folder import folder_lock
with folder_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes stdin
"""


def test_a_second_process_is_stopped_at_once_with_the_holders_pid(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderBusyError, match=rf"'{tmp_path}' is in use by .*\(process {holder.pid}\)"):
            _open(tmp_path, A)
    finally:
        holder.communicate("", timeout=120)
    assert holder.returncode == 0
    with open_folder(tmp_path, A) as out:  # released with the process
        assert (out / LOCK).read_text().strip() == str(os.getpid())

"""Bad command lines end in one line on stderr and exit 2, and as early as they can: option values of the wrong type,
devices this machine does not have, options --load-cache cannot honour, directories and unreadable files where a file
is expected; Ctrl-C ends a run with one line and status 130. Most cases name a model directory that does not exist:
the error asked for comes first, so nothing was loaded before it."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvsqueeze.cli import main, parse_args
from tests.cli.run_cli import SRC


def _doc(tmp_path: Path) -> Path:
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. The code is 4417.")
    return doc


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvsqueeze: error: "), err
    return err.removeprefix("kvsqueeze: error: ")


@pytest.mark.parametrize(
    ("text", "value"),
    [("8", 8), ("8.5", 8.5), ("true", True), ("True", True), ("FALSE", False), ("None", None), ("null", None),
     ("snapkv", "snapkv"), ('"8"', "8"), ('["knorm", "tova"]', ["knorm", "tova"]), ("1e3", 1000.0), ("08", 8),
     ("inf", math.inf), (" 4 ", 4), ("a=b", "a=b")],
)  # fmt: skip
def test_option_values_are_read_as_python_values(text: str, value: object):
    (key, parsed), *_ = parse_args(["generate", "--example", "--option", f"window={text}"]).option
    assert key == "window" and parsed == value and type(parsed) is type(value)


def test_an_option_value_nan_is_a_float_nan():
    (_, parsed), *_ = parse_args(["calibrate", "qfilters", "--option", "n_tokens=nan"]).option
    assert isinstance(parsed, float) and math.isnan(parsed)


@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("snapkv", "window=8.5", "snapkv: window must be an integer, got 8.5"),
        ("snapkv", "window=true", "snapkv: window must be an integer, got True"),
        ("leverage", "seed=2.5", "leverage: seed must be an integer, got 2.5"),
        ("lagkv", "partition_size=2.5", "lagkv: partition_size must be an integer, got 2.5"),
        ("expected_attention", "use_vnorm=1", "expected_attention: use_vnorm must be True or False, got 1"),
        ("adakv", "scorer=nope", "adakv: scorer must be a scoring method"),
        ("compose", "methods=3", "compose: methods must be a list of scoring methods"),
    ],
)
def test_an_option_of_the_wrong_type_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, option: str, message: str
):
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--context-file", str(_doc(tmp_path)), "--question",
            "q", "--method", method, "--option", option]  # fmt: skip
    assert main(argv) == 2
    assert message in _one_error_line(capsys)


def test_calibrate_refuses_an_option_of_the_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["calibrate", "qfilters", "--model", str(tmp_path / "no-model"), "--option", "n_tokens=8.5"]) == 2
    assert _one_error_line(capsys) == "qfilters: n_tokens must be an integer, got 8.5"


def test_option_names_become_methods(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["generate", "--model", str(model_dir), "--context-file", str(_doc(tmp_path)), "--question", "q",
            "--method", "compose", "--ratio", "0.2", "--option", 'methods=["knorm", "tova"]',
            "--max-new-tokens", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "methods=(KNorm(" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("device", "message"), [("foo", "unknown device 'foo'"), ("cuda:99", "'cuda:99' is not available")]
)
@pytest.mark.parametrize("command", [["generate", "--example"], ["calibrate", "qfilters"]])
def test_a_device_this_machine_lacks_is_one_line_listing_the_devices_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], device: str, message: str
):
    assert main([*command, "--model", str(tmp_path / "no-model"), "--device", device]) == 2
    error = _one_error_line(capsys)
    assert message in error and error.endswith("devices here: " + ", ".join(["cpu", *_gpus()]))


def _gpus() -> list[str]:
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_on_a_build_without_it_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["generate", "--example", "--model", str(tmp_path / "no-model"), "--device", "cuda"]) == 2
    error = _one_error_line(capsys)
    assert "device 'cuda' is not available" in error and "devices here: cpu" in error


@pytest.mark.parametrize(
    "extra",
    [["--method", "snapkv"], ["--method", "knorm"], ["--ratio", "0.3"], ["--option", "window=3"],
     ["--budget-policy", "adakv"], ["--chunk-size", "4"], ["--save-cache", "again.safetensors"]],
)  # fmt: skip
def test_load_cache_refuses_what_only_compression_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
):
    cache = tmp_path / "c.safetensors"
    cache.write_bytes(b"not read: the refusal comes first")
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--load-cache", str(cache), "--question", "q", *extra]
    assert main(argv) == 2
    error = _one_error_line(capsys)
    assert error.startswith(f"{extra[0]} cannot go with --load-cache")


def test_load_cache_names_every_refused_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["generate", "--load-cache", str(tmp_path / "c.safetensors"), "--question", "q", "--ratio", "0.3",
            "--chunk-size", "4"]  # fmt: skip
    assert main(argv) == 2
    assert _one_error_line(capsys).startswith("--ratio, --chunk-size cannot go with --load-cache")


def test_without_load_cache_method_and_ratio_keep_their_defaults():
    args = parse_args(["generate", "--example"])
    assert (args.method, args.ratio) == ("knorm", 0.5)
    args = parse_args(["generate", "--load-cache", "c.safetensors", "--question", "q"])
    assert (args.method, args.ratio) == (None, None)


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--context-file", "context file"), ("--load-cache", "cache file"), ("--save-cache", "--save-cache")],
)
def test_a_directory_where_a_file_is_expected_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, what: str
):
    folder = tmp_path / "folder"
    folder.mkdir()
    source = [] if flag in ("--context-file", "--load-cache") else ["--context-file", str(_doc(tmp_path))]
    argv = ["generate", "--model", str(tmp_path / "no-model"), flag, str(folder), *source, "--question", "q"]
    assert main(argv) == 2
    assert _one_error_line(capsys) == f"{what} {str(folder)!r} is a directory, not a file"


def test_save_cache_under_a_file_is_refused_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    doc = _doc(tmp_path)
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--context-file", str(doc), "--question", "q",
            "--save-cache", str(doc / "cache.safetensors")]  # fmt: skip
    assert main(argv) == 2
    assert f"{str(doc)!r} is a file, not a directory" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\xff\xfe\x00text", "is not UTF-8 text (invalid start byte at byte 0)"), (b" \n\t\n", "is empty")],
)
def test_an_unusable_context_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(content)
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--context-file", str(doc), "--question", "q"]
    assert main(argv) == 2
    assert _one_error_line(capsys) == f"context file {str(doc)!r} {message}"


def test_report_on_a_file_or_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(_doc(tmp_path))]) == 2
    assert "is a file; give the results directory" in _one_error_line(capsys)
    assert main(["report", str(tmp_path / "none")]) == 2
    assert _one_error_line(capsys) == f"results directory {str(tmp_path / 'none')!r} does not exist"


def _interrupt(argv: list[str], cwd: Path, when: str, python: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run `kvsqueeze ARGV` (with the interpreter options `python`) in a real process, send it SIGINT (Ctrl-C) once
    stderr shows `when`, return its exit status and the rest of its stderr."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, *python, "-m", "kvsqueeze", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if when in line:
            break
    else:
        raise AssertionError(f"the run ended (status {proc.wait()}) before printing {when!r}")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    return proc.wait(timeout=120), rest


@pytest.mark.parametrize("inside", ["torch.nn.modules", "transformers.utils"])
def test_ctrl_c_while_torch_or_transformers_import_is_one_line_and_status_130(tmp_path: Path, inside: str):
    """A KeyboardInterrupt inside torch's or transformers' import used to reach the user as a traceback (a
    RecursionError, a ModuleNotFoundError or the KeyboardInterrupt itself). `-X importtime` prints each import as it
    completes, so the signal lands while the outer import is still running."""
    doc = _doc(tmp_path)
    argv = ["generate", "--context-file", str(doc), "--question", "q"]
    status, rest = _interrupt(argv, tmp_path, when=f" {inside}\n", python=("-X", "importtime"))
    lines = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert (status, lines) == (130, ["kvsqueeze: interrupted"])


def test_ctrl_c_during_generate_is_one_line_and_status_130(model_dir: Path, tmp_path: Path):
    doc = tmp_path / "long.txt"
    doc.write_text(" ".join(["The harbour was quiet in the morning and the boats rested."] * 40))
    argv = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "q", "--chunk-size", "1"]
    status, rest = _interrupt(argv, tmp_path, when="Compressing with")  # a prefill of ~900 one-token forwards follows
    assert (status, rest) == (130, "kvsqueeze: interrupted\n")


def test_ctrl_c_during_calibrate_is_one_line_and_status_130(model_dir: Path, tmp_path: Path):
    argv = ["calibrate", "qfilters", "--model", str(model_dir), "--force"]
    status, rest = _interrupt(argv, tmp_path, when="Calibrating qfilters")  # about 5 s of calibration follow
    assert status == 130 and "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "kvsqueeze: interrupted"

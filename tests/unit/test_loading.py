"""Converting a GGUF model into the cache folder (`kvsqueeze.loading.convert_gguf`, what `default_model_dir` does for
the embedded SmolLM2), with a tiny real GGUF and real processes: concurrent first runs convert once and all load,
a conversion killed with SIGKILL leaves debris that the next conversion removes, a read-only cache folder loads an
already converted model and refuses clearly to convert into it; a GGUF a package ships in chunks converts the same
way, leaving nothing of the assembled file behind. The same with the embedded model:
tests/integration/test_loading_smollm2.py (slow)."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest
import torch

from kvsqueeze.gguf_packages import GgufPackage
from kvsqueeze.loading import DEBRIS_PREFIX, LOCK_FILE, MARKER, CacheFolderError, convert_gguf, is_converted, load_model
from tests.files import read_only, start_python, write_chunked_package, write_tiny_gguf
from tests.tiny import tiny_tokenizer

CONVERTING = "Converting tiny.gguf once into"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def logits_of(folder: Path) -> torch.Tensor:
    model, tokenizer = load_model(str(folder))
    with torch.no_grad():
        return model(tokenizer("the old baker", return_tensors="pt").input_ids).logits


def debris(folder: Path) -> list[Path]:
    return sorted(folder.glob(DEBRIS_PREFIX + "*"))


def test_converts_once_then_loads(gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "models" / "tiny"
    with caplog.at_level(logging.INFO, logger="kvsqueeze"):
        assert convert_gguf(gguf, target) == target
        assert caplog.text.count(CONVERTING) == 1
        inode = (target / "model.safetensors").stat().st_ino
        assert convert_gguf(gguf, target) == target
        assert caplog.text.count(CONVERTING) == 1  # the second call found the copy
    assert is_converted(target) and (target / MARKER).read_text().startswith("converted from tiny.gguf")
    assert (target / "model.safetensors").stat().st_ino == inode  # a complete copy is never rewritten
    assert debris(target.parent) == [] and (target.parent / LOCK_FILE).exists()
    model, tokenizer = load_model(str(target))
    assert tokenizer("the old baker").input_ids == tiny_tokenizer()("the old baker").input_ids
    assert model.config.num_hidden_layers == 2 and logits_of(target).shape == (1, 7, 500)


WORKER = """
import sys, time, logging
from pathlib import Path
import torch
from kvsqueeze.loading import convert_gguf, load_model
gguf, target, ready, go = map(Path, sys.argv[1:5])
handler = logging.StreamHandler()
handler.setFormatter(logging.Formatter("%(message)s"))
logging.getLogger("kvsqueeze").addHandler(handler)
logging.getLogger("kvsqueeze").setLevel(logging.DEBUG)
ready.touch()
while not go.exists():
    time.sleep(0.005)
folder = convert_gguf(gguf, target)
model, tokenizer = load_model(str(folder))
with torch.no_grad():
    logits = model(tokenizer("the old baker", return_tensors="pt").input_ids).logits
print(folder, repr(float(logits.double().sum())))
"""


def test_concurrent_processes_convert_once_and_all_load(gguf: Path, tmp_path: Path) -> None:
    """Issue 13: three processes converting into one empty cache at once used to convert three times, and one failed
    with "No such file ... model.safetensors" when a later finisher replaced the folder it was loading from."""
    target, go = tmp_path / "cache" / "models" / "tiny", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    workers = [start_python(f"import sys; sys.argv[1:] = {[str(gguf), str(target), str(r), str(go)]!r}\n{WORKER}")
               for r in ready]  # fmt: skip
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # all three start converting within milliseconds of each other
    results = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, results, strict=True):
        assert worker.returncode == 0, err
    outputs = {out.strip() for out, _ in results}
    assert len(outputs) == 1 and outputs.pop().startswith(f"{target} ")  # same folder, same logits
    assert sum(err.count(CONVERTING) for _, err in results) == 1
    assert debris(target.parent) == []


KILLED = """
import os, signal, sys, threading, time
from pathlib import Path
from kvsqueeze.loading import DEBRIS_PREFIX, convert_gguf
gguf, target = map(Path, sys.argv[1:3])
threading.Thread(target=convert_gguf, args=(gguf, target), daemon=True).start()
while not list(target.parent.glob(DEBRIS_PREFIX + "*")):
    time.sleep(0.001)
os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the conversion
"""


def test_killed_conversion_leaves_debris_that_the_next_removes(
    gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13: `kill -9` during the conversion left its `.convert-*` folder (200-540 MB) forever."""
    target = tmp_path / "models" / "tiny"
    killed = start_python(f"import sys; sys.argv[1:] = {[str(gguf), str(target)]!r}\n{KILLED}")
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.communicate()[1]
    left = debris(target.parent)
    assert len(left) == 1 and not target.exists()  # killed mid-way: debris, no copy
    with caplog.at_level(logging.DEBUG, logger="kvsqueeze"):
        convert_gguf(gguf, target)  # the lock the killed process held is free
    assert is_converted(target) and debris(target.parent) == []
    assert f"Removed {left[0]}" in caplog.text and "left by an interrupted conversion" in caplog.text


def test_incomplete_copy_is_converted_again(gguf: Path, tmp_path: Path) -> None:
    target = convert_gguf(gguf, tmp_path / "models" / "tiny")
    expected = logits_of(target)
    (target / "model.safetensors").unlink()  # e.g. removed by hand
    assert not is_converted(target)
    convert_gguf(gguf, target)
    assert is_converted(target) and debris(target.parent) == []
    torch.testing.assert_close(logits_of(target), expected, rtol=0, atol=0)


def test_read_only_cache_loads_a_converted_copy(gguf: Path, tmp_path: Path) -> None:
    target = convert_gguf(gguf, tmp_path / "cache" / "models" / "tiny")
    expected = logits_of(target)
    with read_only(tmp_path / "cache"):
        assert convert_gguf(gguf, target) == target
        torch.testing.assert_close(logits_of(target), expected, rtol=0, atol=0)


def test_read_only_cache_without_a_copy_is_a_clear_error(gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with read_only(cache), pytest.raises(CacheFolderError, match=r"not writable.*KVSQUEEZE_CACHE") as err:
        convert_gguf(gguf, cache / "models" / "tiny")
    assert str(cache / "models") in str(err.value) and isinstance(err.value, ValueError)  # the CLI: exit 2
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheFolderError, match="not writable"):
        convert_gguf(gguf, blocker / "models" / "tiny")


def test_a_gguf_shipped_in_chunks_converts_like_the_whole_file(
    gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_chunked_package(tmp_path / "site", gguf, "kvsqueeze_test_chunked_tiny")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    package = GgufPackage("tiny", "tiny", "kvsqueeze_test_chunked_tiny", "tiny.gguf", "pip install tiny", True)
    target = convert_gguf(package, tmp_path / "models" / "tiny-chunked")
    assert is_converted(target) and (target / MARKER).read_text().startswith("converted from tiny.gguf")
    assert not list(target.rglob("*.gguf")) and debris(target.parent) == []  # the assembled file is gone
    whole = convert_gguf(gguf, tmp_path / "models" / "tiny-whole")
    torch.testing.assert_close(logits_of(target), logits_of(whole), rtol=0, atol=0)

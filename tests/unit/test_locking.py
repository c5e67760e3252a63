"""The file lock between processes (real processes, real `flock`): a second holder waits and says so, a holder killed
with SIGKILL releases it, a lock file that cannot be created (read-only folder) yields False instead of failing, and
an existing lock file in a read-only folder still locks."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest

from kvsqueeze.locking import file_lock
from tests.files import read_only, start_python

HOLD = """
import logging, sys, time
from pathlib import Path
from kvsqueeze.locking import file_lock
logging.basicConfig(level=logging.INFO, format="%(message)s")
with file_lock(Path(sys.argv[1]), "testing") as held:
    print("held" if held else "not held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def hold(lock: Path, seconds: float):
    """A process that takes `lock`, prints "held", keeps it `seconds`, then prints "released" and exits."""
    return start_python(f"import sys; sys.argv[1:] = [{str(lock)!r}, '{seconds}']\n{HOLD}")


def wait_for_line(process, line: str) -> None:
    assert process.stdout is not None
    got = process.stdout.readline().strip()
    assert got == line, f"expected {line!r}, got {got!r}; stderr: {process.stderr.read() if got == '' else ''}"


def test_second_holder_waits_for_the_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "sub" / "x.lock"  # its folder is created on first use
    first = hold(lock, 1.5)
    wait_for_line(first, "held")
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="kvsqueeze"), file_lock(lock, "computing x") as held:
        waited = time.monotonic() - start
        assert held
    assert first.stdout is not None and first.stdout.read().strip() == "released"
    assert waited > 1.0  # the first held it 1.5 s after saying "held"
    assert f"Waiting for another process computing x (lock {lock})" in caplog.text
    assert lock.exists()  # left in place: removing it would let a waiter and a newcomer both "hold" it


def test_sigkill_releases_the_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "x.lock"
    holder = hold(lock, 600)
    wait_for_line(holder, "held")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    with caplog.at_level(logging.INFO, logger="kvsqueeze"), file_lock(lock) as held:
        assert held
    assert "Waiting" not in caplog.text  # free at once, not after a timeout


def test_read_only_folder_yields_false(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder), file_lock(folder / "x.lock") as held:
        assert held is False
        assert not (folder / "x.lock").exists()
    with read_only(folder), file_lock(folder / "sub" / "x.lock") as held:  # nor can its folder be created
        assert held is False


def test_existing_lock_file_in_read_only_folder_still_locks(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "x.lock").touch()
    with read_only(folder):
        with file_lock(folder / "x.lock") as held:
            assert held
            other = hold(folder / "x.lock", 0)
            time.sleep(1.0)
            assert other.poll() is None  # blocked behind us
        wait_for_line(other, "held")
        assert other.wait(timeout=60) == 0
        assert other.stderr is not None and "Waiting for another process testing" in other.stderr.read()


def test_exception_in_block_releases_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with pytest.raises(RuntimeError, match="boom"), file_lock(lock):
        raise RuntimeError("boom")
    other = hold(lock, 0)
    wait_for_line(other, "held")
    assert other.wait(timeout=60) == 0

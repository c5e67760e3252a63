"""Advisory file locks between processes: one process computes a shared file (a converted model, a calibration
artifact) while the others wait for it and then reuse it.

`file_lock(path)` holds an exclusive `flock` on the lock file `path` (created on first use and left in place:
deleting a lock file while another process waits on it would let two processes hold "the" lock). The kernel releases
the lock when its holder exits in any way, `kill -9` included, so a crashed process never blocks the next run.

A lock file that cannot be created (a read-only cache folder) is not an error: `file_lock` then yields False and the
caller goes on without writing (it computes in memory, or reads what is already there). Where the lock file exists but
is read-only, it is opened for reading, which is enough for `flock`, so readers still wait for a writer.

On a platform without `fcntl` (Windows) the lock is skipped: there, concurrent first runs may each compute.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["file_lock"]

logger = logging.getLogger("kvsqueeze")


def _open_lock_file(path: Path) -> int | None:
    """A descriptor of the lock file (created if needed), or None when it cannot be created nor opened."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        try:
            return os.open(path, os.O_RDONLY)  # an existing lock file in a read-only folder still locks
        except OSError:
            logger.debug("No lock: cannot create %s (%s)", path, err)
            return None


@contextlib.contextmanager
def file_lock(path: str | Path, purpose: str = "") -> Iterator[bool]:
    """Hold an exclusive lock on the lock file `path` for the `with` block; yields True when held, False when the lock
    file cannot be created (a read-only folder: the caller must expect its writes there to fail).

    A process that finds the lock taken logs (at info level) that it waits for another process doing `purpose`.
    """
    path = Path(path)
    if fcntl is None:
        yield True  # no flock here (see the module's docstring)
        return
    fd = _open_lock_file(path)
    if fd is None:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process %s (lock %s) ...", purpose or "holding the lock", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock

"""Atomic writes: a file is either the old one or the complete new one, never half written.

Everything the library writes for later runs to trust (saved caches, calibration artifacts, converted models,
benchmark configs) goes through here: the content is written to a temporary file in the same folder, flushed to
disk, then renamed over the target (`os.replace` is atomic on POSIX and Windows). A crash or a full disk leaves the
old file (or none) and no temporary debris.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic", "write_text_atomic"]


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file next to `path`, then move it to `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data reaches the disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

"""Where kvsqueeze keeps files between runs: one base folder for the converted default model (`models/`) and the
calibration artifacts (`calibration/`).

The base folder is the first of
  1. $KVSQUEEZE_CACHE,
  2. $XDG_CACHE_HOME/kvsqueeze (the XDG Base Directory specification; a relative XDG_CACHE_HOME is ignored, as the
     specification asks),
  3. ~/.cache/kvsqueeze.
A subfolder can have a variable of its own that overrides all of them ($KVSQUEEZE_CALIBRATION_DIR for calibration).
An empty variable counts as unset.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KVSQUEEZE_CACHE"


def cache_dir() -> Path:
    """kvsqueeze's base cache folder ($KVSQUEEZE_CACHE, else $XDG_CACHE_HOME/kvsqueeze, else ~/.cache/kvsqueeze)."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "kvsqueeze"
    return Path.home() / ".cache" / "kvsqueeze"


def cache_subdir(name: str, env: str | None = None) -> Path:
    """The folder `name` of the base cache folder, or $`env` when that variable is set."""
    override = os.environ.get(env) if env else None
    return Path(override) if override else cache_dir() / name

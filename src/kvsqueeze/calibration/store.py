"""Calibration artifacts on disk: computed once per (model weights, settings, kvsqueeze version), loaded afterwards.

Layout: `<dir>/<kind>/<key>.safetensors` (the tensors) next to `<key>.json` (model, kind, settings, version, creation
time, seconds taken). `<dir>` is $KVSQUEEZE_CALIBRATION_DIR if set, else `kvsqueeze.paths.cache_dir()/calibration`
($KVSQUEEZE_CACHE, else $XDG_CACHE_HOME/kvsqueeze, else ~/.cache/kvsqueeze). Files are written to a temporary name,
then renamed: a reader never sees half a file. A missing or unreadable artifact is computed again.

The key hashes the kind, the settings (a JSON-serializable dict), the kvsqueeze version and the model's fingerprint
(`kvsqueeze.fingerprint`: its class, its configuration and samples of every weight, the same for a float32 and a
bfloat16 load, so one artifact serves both). It costs milliseconds instead of reading gigabytes, at a price: an edit of
the weights that touches none of the sampled elements goes unnoticed; pass `force=True` (`kvsqueeze calibrate
--force`) after such an edit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor, nn

from kvsqueeze import __version__
from kvsqueeze.fingerprint import model_fingerprint
from kvsqueeze.paths import cache_subdir

logger = logging.getLogger("kvsqueeze")

DIR_ENV = "KVSQUEEZE_CALIBRATION_DIR"
T = TypeVar("T")


def calibration_dir() -> Path:
    """Where calibration artifacts live ($KVSQUEEZE_CALIBRATION_DIR, else `kvsqueeze.paths.cache_dir()/calibration`)."""
    return cache_subdir("calibration", DIR_ENV)


def _settings_json(settings: dict[str, Any]) -> str:
    try:
        return json.dumps(settings, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"calibration settings must be JSON-serializable, got {settings!r}: {err}") from None


def artifact_path(kind: str, model: nn.Module, settings: dict[str, Any]) -> Path:
    """The .safetensors file holding the `kind` artifact of this model and these settings (it may not exist yet)."""
    if not re.fullmatch(r"[a-z0-9_]+", kind):
        raise ValueError(f"calibration kind must be lowercase letters, digits and underscores, got {kind!r}")
    payload = json.dumps([kind, model_fingerprint(model), _settings_json(settings), __version__])
    key = hashlib.sha256(payload.encode()).hexdigest()[:20]
    return calibration_dir() / kind / f"{key}.safetensors"


def read_info(path: Path) -> dict[str, Any]:
    """The JSON sidecar of an artifact (model, kind, settings, version, created, seconds)."""
    return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))


def load_artifact(path: Path) -> dict[str, Tensor] | None:
    """The tensors of an artifact (on CPU), or None when it or its sidecar is missing or unreadable."""
    from safetensors.torch import load_file

    if not path.exists() or not path.with_suffix(".json").exists():
        return None
    try:
        read_info(path)
        return load_file(str(path))
    except Exception as err:  # a truncated or foreign file: compute it again rather than fail
        logger.warning("Ignoring unreadable calibration artifact %s (%s); computing it again.", path, err)
        return None


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_artifact(path: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Write the tensors (safetensors) and then the sidecar, each atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    _write_atomic(path, lambda tmp: save_file(cpu, tmp))
    text = json.dumps(info, indent=2, sort_keys=True, default=str)
    _write_atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def model_name(model: nn.Module) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def calibrated(
    kind: str,
    model: nn.Module,
    settings: dict[str, Any],
    compute: Callable[[], dict[str, Tensor]],
    force: bool = False,
    describe: Callable[[dict[str, Tensor]], dict[str, Any]] | None = None,
) -> dict[str, Tensor]:
    """Load the `kind` artifact for this model and settings, or compute it with `compute()` and save it.

    `force=True` always computes (and overwrites). Loaded tensors are on CPU; computed ones are returned as computed.
    `describe(tensors)`, if given, adds a JSON-serializable summary (e.g. held-out accuracy) to the sidecar as
    "results".
    """
    path = artifact_path(kind, model, settings)
    if not force:
        tensors = load_artifact(path)
        if tensors is not None:
            logger.debug("Loaded %s calibration from %s", kind, path)
            return tensors
    logger.info("Calibrating %s for %s (once per model; saved to %s) ...", kind, model_name(model), path)
    start = time.perf_counter()
    tensors = compute()
    seconds = time.perf_counter() - start
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()
    ):
        raise TypeError(f"the {kind} calibration must return a dict of name -> Tensor, got {type(tensors).__name__}")
    info = {
        "kind": kind,
        "model": model_name(model),
        "fingerprint": model_fingerprint(model),
        "settings": settings,
        "kvsqueeze_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    if describe is not None:
        info["results"] = describe(tensors)
    save_artifact(path, tensors, info)
    logger.info("Calibrated %s in %.1f s", kind, seconds)
    return tensors


# In-process memory: calibrated values per live model object, so a method does not even hash the model on every call.
_MEMORY: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def remembered(model: nn.Module, key: Hashable, load: Callable[[], T], refresh: bool = False) -> T:
    """`load()` once per (live model object, key); later calls return the same value (`refresh=True` loads again).
    Forgotten with the model, or with `forget(model)` (needed after changing its weights in place)."""
    entries = _MEMORY.setdefault(model, {})
    if refresh or key not in entries:
        entries[key] = load()
    return entries[key]


def forget(model: nn.Module | None = None) -> None:
    """Drop the in-process memory of one model (or of all)."""
    if model is None:
        _MEMORY.clear()
    else:
        _MEMORY.pop(model, None)

"""Calibration artifacts on disk: computed once per (model weights, settings, kvsqueeze version), loaded afterwards.

Layout: `<dir>/<kind>/<key>.safetensors` (the tensors) next to `<key>.json` (the sidecar: kind, model, fingerprint,
settings, version, creation time, seconds taken, each tensor's dtype/shape/finiteness and a SHA-256 checksum over all
of it and the tensor data) and `<key>.lock` (the file lock). `<dir>` is $KVSQUEEZE_CALIBRATION_DIR if set, else
`kvsqueeze.paths.cache_dir()/calibration` ($KVSQUEEZE_CACHE, else $XDG_CACHE_HOME/kvsqueeze, else
~/.cache/kvsqueeze).

What the files promise:
- one computation: `calibrated` computes and saves under the artifact's file lock, so concurrent processes compute
  once; the others wait and load the result;
- never half a file: each file is written to a temporary name, flushed, then renamed (`kvsqueeze.atomic`); temporary
  files of a killed writer are removed by the next one;
- never a silent lie: a missing artifact is computed; one whose tensors, sidecar and checksum do not agree (flipped
  bytes, a re-saved file, NaN where there was none, another artifact's sidecar) is reported with a warning and
  computed again;
- a read-only folder still works: the artifact is computed and used in memory, with one warning that it could not
  be saved and why.

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
import re
import time
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from kvsqueeze import __version__
from kvsqueeze.atomic import write_atomic, write_text_atomic
from kvsqueeze.checksum import tensors_digest
from kvsqueeze.fingerprint import model_fingerprint, model_name
from kvsqueeze.locking import file_lock
from kvsqueeze.paths import cache_subdir

logger = logging.getLogger("kvsqueeze")

DIR_ENV = "KVSQUEEZE_CALIBRATION_DIR"
FORMAT = "kvsqueeze-calibration/2"  # /2: the sidecar lists the tensors and carries a checksum
T = TypeVar("T")


def calibration_dir() -> Path:
    """Where calibration artifacts live ($KVSQUEEZE_CALIBRATION_DIR, else `kvsqueeze.paths.cache_dir()/calibration`)."""
    return cache_subdir("calibration", DIR_ENV)


def _settings_json(settings: dict[str, Any]) -> str:
    try:
        return json.dumps(settings, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"calibration settings must be JSON-serializable, got {settings!r}: {err}") from None


def artifact_identity(kind: str, model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    """What an artifact is: {"kind", "fingerprint", "settings", "kvsqueeze_version"} (its sidecar records them)."""
    if not re.fullmatch(r"[a-z0-9_]+", kind):
        raise ValueError(f"calibration kind must be lowercase letters, digits and underscores, got {kind!r}")
    _settings_json(settings)
    return {
        "kind": kind,
        "fingerprint": model_fingerprint(model),
        "settings": settings,
        "kvsqueeze_version": __version__,
    }


def _path_of(identity: dict[str, Any]) -> Path:
    payload = json.dumps([identity["kind"], identity["fingerprint"], _settings_json(identity["settings"]), __version__])
    key = hashlib.sha256(payload.encode()).hexdigest()[:20]
    return calibration_dir() / identity["kind"] / f"{key}.safetensors"


def artifact_path(kind: str, model: nn.Module, settings: dict[str, Any]) -> Path:
    """The .safetensors file holding the `kind` artifact of this model and these settings (it may not exist yet)."""
    return _path_of(artifact_identity(kind, model, settings))


class CalibrationFileError(ValueError):
    """A calibration artifact that cannot be trusted: unreadable, damaged, or not the one asked for."""


def _normalized(info: dict[str, Any]) -> dict[str, Any]:
    """`info` as it reads back from its JSON sidecar (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(info, default=str))


def tensor_listing(tensors: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """{name: {"dtype", "shape", "finite"}} of each tensor, as recorded in the sidecar."""
    return {
        name: {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "finite": bool(torch.isfinite(t).all()) if t.is_floating_point() else True,
        }
        for name, t in sorted(tensors.items())
    }


# Artifacts computed in this process that could not be saved (a read-only folder): (tensors, sidecar) by path.
# `calibrated` and `read_info` answer from here, so a read-only folder costs one computation per process, not one per
# call, and a caller that reads the sidecar after `calibrated` works there too.
_UNSAVED: dict[Path, tuple[dict[str, Tensor], dict[str, Any]]] = {}


def read_info(path: Path) -> dict[str, Any]:
    """The JSON sidecar of an artifact (kind, model, fingerprint, settings, version, created, seconds, tensors,
    checksum, and "results" where the calibration describes itself); for an artifact this process computed but could
    not save, the sidecar it would have written. Raises FileNotFoundError when it is missing and
    `CalibrationFileError` (a ValueError) naming the file when it is not a JSON object."""
    if path in _UNSAVED:
        return dict(_UNSAVED[path][1])
    return _read_sidecar(path)


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"calibration sidecar {str(sidecar)!r} does not exist")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationFileError(f"calibration sidecar {str(sidecar)!r} is unreadable ({err})") from None
    if not isinstance(info, dict):
        raise CalibrationFileError(f"calibration sidecar {str(sidecar)!r} is not a JSON object")
    return info


def _check(info: dict[str, Any], tensors: dict[str, Tensor], identity: dict[str, Any] | None) -> None:
    """Raise CalibrationFileError (without the file name) when the sidecar and the tensors do not vouch for each
    other, or (given `identity`) are not the artifact asked for."""
    if info.get("format") != FORMAT or not isinstance(info.get("checksum"), str):
        raise CalibrationFileError(f"the sidecar has no {FORMAT} checksum (written by an older kvsqueeze?)")
    for key, want in (identity or {}).items():
        if json.dumps(info.get(key), sort_keys=True) != json.dumps(want, sort_keys=True):
            raise CalibrationFileError(f"the sidecar is for {key} {info.get(key)!r}, not {want!r}")
    listing, recorded = tensor_listing(tensors), info.get("tensors")
    if listing != recorded:
        if not isinstance(recorded, dict) or sorted(recorded) != sorted(listing):
            raise CalibrationFileError(f"the file holds tensors {sorted(listing)}, the sidecar lists others")
        name = next(n for n in sorted(listing) if listing[n] != recorded[n])
        raise CalibrationFileError(f"tensor {name!r} is {listing[name]}, the sidecar says {recorded[name]}")
    if tensors_digest(tensors, info) != info["checksum"]:
        raise CalibrationFileError("the checksum does not match: the file or its sidecar was changed")


def read_artifact(path: Path, identity: dict[str, Any] | None = None) -> dict[str, Tensor] | None:
    """The tensors of an artifact (on CPU), after checking them against the sidecar's listing (names, dtypes, shapes,
    finite values) and checksum and, given `identity` ({"kind", "fingerprint", "settings", "kvsqueeze_version"}),
    that it is the artifact asked for. None when the tensors or the sidecar are missing; a `CalibrationFileError`
    naming the file when they are there but cannot be trusted."""
    from safetensors.torch import load_file

    if not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    info = _read_sidecar(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error type, an OSError, or a foreign file's surprise
        raise CalibrationFileError(f"calibration artifact {str(path)!r} is unreadable ({err})") from None
    try:
        _check(info, tensors, identity)
    except CalibrationFileError as err:
        raise CalibrationFileError(f"calibration artifact {str(path)!r} cannot be trusted: {err}") from None
    return tensors


def load_artifact(path: Path, identity: dict[str, Any] | None = None) -> dict[str, Tensor] | None:
    """`read_artifact`, except that an artifact that cannot be trusted is reported (a warning) and treated as
    missing: the caller computes it again."""
    try:
        return read_artifact(path, identity)
    except CalibrationFileError as err:
        logger.warning("%s; computing it again.", err)
        return None


def save_artifact(path: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """Write the tensors (safetensors) and then the sidecar, each atomically; the sidecar is `info` plus the tensors'
    listing and the checksum. Returns the sidecar as written."""
    from safetensors.torch import save_file

    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    sidecar = _sealed(cpu, info)
    write_atomic(path, lambda tmp: save_file(cpu, tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True))
    return sidecar


def _sealed(tensors: dict[str, Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of `tensors`: `info` with the format, the tensors' listing and the checksum over both."""
    sidecar = _normalized({**info, "format": FORMAT, "tensors": tensor_listing(tensors)})
    sidecar.pop("checksum", None)
    sidecar["checksum"] = tensors_digest(tensors, sidecar)
    return sidecar


def remove_temporary(path: Path) -> list[Path]:
    """Remove the temporary files that writers of `path` killed mid-write left next to it; call it only with the
    artifact's lock held. Returns the removed files (each logged at debug level)."""
    stale = [p for name in (path.name, path.with_suffix(".json").name) for p in path.parent.glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
        logger.debug("Removed %s, left by an interrupted calibration save", p)
    return stale


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

    Under the artifact's file lock (`<key>.lock`): a process that finds another computing the same artifact waits,
    then loads it. An artifact that fails its checks (see `read_artifact`) is reported and computed again. Where the
    artifact cannot be saved (a read-only folder, a full disk), the computed tensors are used all the same, with one
    warning saying why they were not saved.
    """
    identity = artifact_identity(kind, model, settings)
    path = _path_of(identity)
    with file_lock(path.with_suffix(".lock"), f"computing the {kind} calibration"):
        if not force:
            tensors = _UNSAVED[path][0] if path in _UNSAVED else load_artifact(path, identity)
            if tensors is not None:
                logger.debug("Loaded %s calibration from %s", kind, path)
                return tensors
        logger.info("Calibrating %s for %s (once per model; saved to %s) ...", kind, model_name(model), path)
        tensors, info = _compute(identity, compute, describe)
        info["model"] = model_name(model)
        _save_or_keep(path, tensors, info)
    logger.info("Calibrated %s in %.1f s", kind, info["seconds"])
    return tensors


def _compute(
    identity: dict[str, Any],
    compute: Callable[[], dict[str, Tensor]],
    describe: Callable[[dict[str, Tensor]], dict[str, Any]] | None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, sidecar info) of one run of `compute`."""
    start = time.perf_counter()
    tensors = compute()
    seconds = time.perf_counter() - start
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()
    ):
        kind, got = identity["kind"], type(tensors).__name__
        raise TypeError(f"the {kind} calibration must return a dict of name -> Tensor, got {got}")
    info = {
        **identity,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    if describe is not None:
        info["results"] = describe(tensors)
    return tensors, info


def _save_or_keep(path: Path, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Save the artifact; where that fails, keep it in memory for this process (`calibrated` and `read_info` answer
    from there) and warn, once per artifact and process."""
    from safetensors import SafetensorError

    try:
        remove_temporary(path)
        save_artifact(path, tensors, info)
    except (OSError, SafetensorError) as err:
        _UNSAVED[path] = (tensors, _sealed({name: t.detach().cpu() for name, t in tensors.items()}, info))
        logger.warning(
            "Could not save the %s calibration to %s (%s); using it for this run only (it is computed again next "
            "run until the folder is writable: set %s or KVSQUEEZE_CACHE to move it).", info["kind"], path, err,
            DIR_ENV,
        )  # fmt: skip
    else:
        _UNSAVED.pop(path, None)


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

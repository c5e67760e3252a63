"""Save a compressed cache to disk and load it back, so a long document is compressed once and reused.

The file is safetensors: the cache's tensors (`KVCache.to_tensors`) plus string metadata -- the kvsqueeze version,
the model's identity fingerprint, the method's repr and ratio, the tokens seen per row, any extra JSON a caller adds
(a `Conversation` stores its messages there) and a SHA-256 checksum of the tensor data. Writes are atomic.

A damaged file never answers: loading checks, in order, that the file is readable safetensors, that its metadata is
complete and well formed, that the metadata and tensor data match the checksum, that it was computed by this very
model (architecture and weights fingerprint), and that every layer's tensors fit the model (layer count, heads,
head dim, float keys/values without NaN, positions in slot order and below the tokens seen; for a quantized layer
its spec, uint8 codes, scales and zero points of the layout's shapes). Any failure is one `CacheFileError` (a
ValueError) naming the file and what is wrong. A quantized cache is saved quantized (codes, scales, zero points and
the full-precision residual) and comes back quantized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kvsqueeze import __version__
from kvsqueeze.atomic import write_atomic
from kvsqueeze.cache import KVCache
from kvsqueeze.checksum import tensors_digest
from kvsqueeze.fingerprint import model_fingerprint, model_name
from kvsqueeze.methods.base import Method
from kvsqueeze.models import get_adapter

FORMAT = "kvsqueeze-cache/2"  # /2: a checksum of the tensor data in the metadata
_METADATA = ("format", "kvsqueeze_version", "model", "fingerprint", "method", "ratio", "seen", "extra", "checksum")


@dataclass
class SavedCache:
    """A cache loaded from disk and what was recorded with it."""

    cache: KVCache
    method: str  # repr of the method that compressed it ("None" if uncompressed)
    ratio: float | None
    seen: list[int]  # tokens seen per row (positions continue from there)
    model: str
    fingerprint: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)


class CacheFileError(ValueError):
    """A saved cache that cannot be used: unreadable, damaged, incomplete, or made by another model."""


def save_cache(
    path: str | Path, cache: KVCache, model: Any, method: Method | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write `cache` (computed by `model`, compressed by `method`) to a safetensors file, atomically."""
    seen = cache.real_tokens_seen()
    if seen is None:
        raise ValueError("the cache is empty: prefill a context before saving it")
    tensors = {name: t.detach().cpu() for name, t in cache.to_tensors().items()}
    metadata = {
        "format": FORMAT,
        "kvsqueeze_version": __version__,
        "model": model_name(model),
        "fingerprint": model_fingerprint(model),
        "method": repr(method),
        "ratio": json.dumps(getattr(method, "ratio", None)),
        "seen": json.dumps([int(s) for s in seen.tolist()]),
        "extra": json.dumps(extra or {}),
    }
    metadata["checksum"] = tensors_digest(tensors, metadata)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_metadata(path: Path) -> dict[str, str]:
    name = str(path)
    if not path.exists():
        raise CacheFileError(f"cache file {name!r} does not exist")
    if path.is_dir():
        raise CacheFileError(f"{name!r} is a directory, not a cache file")
    try:
        with safe_open(name, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as err:
        raise CacheFileError(f"{name!r} is not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{name!r} is not a kvsqueeze cache file (format {meta.get('format')!r}, need {FORMAT})")
    missing = [key for key in _METADATA if key not in meta]
    if missing:
        raise CacheFileError(f"{name!r}: metadata {missing} are missing")
    return meta


def _parse(path: Path, meta: dict[str, str]) -> tuple[float | None, list[int], dict[str, Any]]:
    """The JSON fields of the metadata: ratio, seen, extra."""
    try:
        ratio, seen, extra = (json.loads(meta[key]) for key in ("ratio", "seen", "extra"))
    except json.JSONDecodeError as err:
        raise CacheFileError(f"{str(path)!r}: malformed metadata ({err})") from None
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        raise CacheFileError(f"{str(path)!r}: metadata ratio {ratio!r} is not a number")
    if not isinstance(seen, list) or not seen or not all(isinstance(s, int) and s >= 0 for s in seen):
        raise CacheFileError(f"{str(path)!r}: metadata seen {seen!r} is not a list of token counts >= 0")
    if not isinstance(extra, dict):
        raise CacheFileError(f"{str(path)!r}: metadata extra is not a JSON object")
    return ratio, seen, extra


def load_cache(path: str | Path, model: Any) -> SavedCache:
    """Load a cache saved by `save_cache` for `model`; any problem with the file raises `CacheFileError` (see the
    module docstring for what is checked)."""
    path = Path(path)
    meta = _read_metadata(path)
    ratio, seen, extra = _parse(path, meta)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CacheFileError(f"{str(path)!r}: the tensor data cannot be read ({err})") from None
    if tensors_digest(tensors, meta) != meta["checksum"]:
        raise CacheFileError(f"{str(path)!r}: the data does not match its checksum (the file is damaged or was edited)")
    mine = model_fingerprint(model)
    if meta["fingerprint"] != mine:
        raise CacheFileError(
            f"{str(path)!r} was computed by model {meta['model']!r} (fingerprint {meta['fingerprint']}), not by this "
            f"model {model_name(model)!r} (fingerprint {mine}): a compressed cache only works with the model that made "
            "it."
        )
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    # keys and values (and a quantized layer's scales, zero points and residual) in the model's dtype
    tensors = {n: t.to(device, dtype) if t.is_floating_point() else t.to(device) for n, t in tensors.items()}
    adapter = get_adapter(model)
    try:
        cache = KVCache.from_tensors(model.config, tensors, adapter.n_kv_heads, adapter.head_dim)
    except ValueError as err:
        raise CacheFileError(f"{str(path)!r}: {err}") from None
    if cache.real_tokens_seen() is None or cache.real_tokens_seen().tolist() != seen:  # type: ignore[union-attr]
        raise CacheFileError(f"{str(path)!r}: metadata seen {seen} does not match the layers' tokens seen")
    return SavedCache(
        cache=cache,
        method=meta["method"],
        ratio=ratio,
        seen=seen,
        model=meta["model"],
        fingerprint=meta["fingerprint"],
        version=meta["kvsqueeze_version"],
        extra=extra,
    )

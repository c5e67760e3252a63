"""Save a compressed cache to disk and load it back, so a long document is compressed once and reused.

The file is safetensors: the cache's tensors (`KVCache.to_tensors`) plus string metadata -- the kvsqueeze version,
the model's identity fingerprint, the method's repr and ratio, the tokens seen per row, and any extra JSON a caller
adds (a `Conversation` stores its messages there). Loading checks the fingerprint against the model it is given:
a cache is only valid for the exact model (architecture and weights) that computed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from kvsqueeze import __version__
from kvsqueeze.cache import KVCache
from kvsqueeze.fingerprint import model_fingerprint
from kvsqueeze.methods.base import Method

FORMAT = "kvsqueeze-cache/1"


def model_name(model: Any) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "model_type", "?"))


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


def save_cache(
    path: str | Path, cache: KVCache, model: Any, method: Method | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write `cache` (computed by `model`, compressed by `method`) to a safetensors file."""
    seen = cache.real_tokens_seen()
    if seen is None:
        raise ValueError("the cache is empty: prefill a context before saving it")
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
    tensors = {name: t.detach().cpu() for name, t in cache.to_tensors().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_cache(path: str | Path, model: Any) -> SavedCache:
    """Load a cache saved by `save_cache` for `model`; a file from another model raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cache file {str(path)!r} does not exist")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a kvsqueeze cache file (format {meta.get('format')!r}, need {FORMAT})")
    mine = model_fingerprint(model)
    if meta["fingerprint"] != mine:
        raise ValueError(
            f"{str(path)!r} was computed by model {meta['model']!r} (fingerprint {meta['fingerprint']}), not by this "
            f"model {model_name(model)!r} (fingerprint {mine}): a compressed cache only works with the model that made "
            "it."
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tensors = load_file(str(path), device=str(device))
    for name in list(tensors):
        if name.endswith((".keys", ".values")):
            tensors[name] = tensors[name].to(dtype)
    return SavedCache(
        cache=KVCache.from_tensors(model.config, tensors),
        method=meta["method"],
        ratio=json.loads(meta["ratio"]),
        seen=json.loads(meta["seen"]),
        model=meta["model"],
        fingerprint=meta["fingerprint"],
        version=meta["kvsqueeze_version"],
        extra=json.loads(meta["extra"]),
    )


def answer_saved(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    questions: list[str],
    max_new_tokens: int = 32,
    answer_prefix: str = "",
    decode_target: int | None = None,
    decode_every: int = 32,
) -> tuple[list[str], SavedCache]:
    """Answer questions over a context cache saved by `save_cache` (e.g. by `kvsqueeze generate --save-cache`)."""
    from kvsqueeze.pipeline import answer, decoding_method, split_prompt

    if not questions:
        raise ValueError("give at least one question")
    saved = load_cache(path, model)
    if len(saved.seen) != 1:
        raise ValueError(f"{str(path)!r} holds {len(saved.seen)} contexts; answer_saved reads files of one context")
    template = bool(saved.extra.get("chat_template", True))
    tails = [split_prompt(tokenizer, "-", q, answer_prefix, template)[1] for q in questions]
    decode = decoding_method(None, decode_target, decode_every)
    texts, _, _ = answer(model, tokenizer, saved.cache, [0] * len(questions), tails, max_new_tokens, decode)
    return texts, saved

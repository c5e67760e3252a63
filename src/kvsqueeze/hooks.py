"""`with attach(model):` routes the model's attention through kvsqueeze and announces each forward's tokens to its
KVCache (positions and padding), without compressing. `kvsqueeze.compress` builds on it. Hooks are always removed
on exit and the model's own attention implementation is put back.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvsqueeze.attention import BACKENDS, PREFIX, implementation_name, register
from kvsqueeze.cache import KVCache
from kvsqueeze.models import ModelAdapter, get_adapter

__all__ = ["attach", "detached", "forward_cache", "is_attached"]


def is_attached(model: Any) -> bool:
    """True while the model's attention runs through kvsqueeze (inside `attach` or `compress`)."""
    return str(getattr(model.config, "_attn_implementation", "") or "").startswith(PREFIX)


@contextmanager
def detached(model: Any) -> Iterator[None]:
    """Inside `attach`/`compress`, run the model's own attention instead of kvsqueeze's for this block (a lazy
    calibration's plain forwards); restored on exit. Outside them, nothing changes."""
    current = str(getattr(model.config, "_attn_implementation", "") or "")
    if not is_attached(model):
        yield
        return
    _set_attention(model, current.removeprefix(PREFIX))
    try:
        yield
    finally:
        _set_attention(model, current)


def forward_cache(kwargs: dict[str, Any], output: Any) -> Any:
    """The cache a finished forward used: passed by keyword, else the one it returned."""
    cache = kwargs.get("past_key_values")
    return getattr(output, "past_key_values", None) if cache is None else cache


def _set_attention(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - every PreTrainedModel has it
        model.config._attn_implementation = name


def _inner_backend(current: str | None, backend: str | None) -> str:
    if backend is not None:
        implementation_name(backend)  # validates
        return backend
    if current and current.startswith(PREFIX):
        return current.removeprefix(PREFIX)
    return current if current in BACKENDS else "sdpa"  # flash/flex: sdpa computes the same attention


def _bound_arguments(model: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:  # all by keyword (as `generate` and kvsqueeze call the model): nothing to bind
        return dict(kwargs)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    return {**bound, **extra}


def _prepare_step(model: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook: make sure a KVCache is used and tell it the positions and padding of the new tokens."""
    kw = _bound_arguments(model, args, kwargs)
    cache = kw.get("past_key_values")
    tokens = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    if tokens is None:
        return args, kwargs
    if cache is None:
        if kw.get("use_cache") is False:
            raise ValueError("kvsqueeze needs a cache: do not pass use_cache=False inside attach()/compress().")
        cache = kw["past_key_values"] = KVCache(model.config)
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"kvsqueeze needs past_key_values=kvsqueeze.KVCache(model.config), got {type(cache).__name__}. "
            "transformers' own caches cannot be pruned per layer, row and head."
        )
    batch, q_len = tokens.shape[0], tokens.shape[1]
    mask = kw.get("attention_mask")
    valid = (
        torch.ones(batch, q_len, dtype=torch.bool, device=tokens.device)
        if mask is None
        else mask[:, -q_len:].to(tokens.device).bool()
    )
    positions = kw.get("position_ids")
    if positions is None:
        seen = cache.next_positions()  # the uncompressed length, unless keys were re-rotated
        start = seen.to(tokens.device)[:, None] if seen is not None else 0
        positions = (start + valid.long().cumsum(dim=1) - 1).clamp(min=0)
        kw["position_ids"] = positions
    cache.begin_step(positions.expand(batch, q_len), valid)
    return (), kw


def _end_step(model: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    cache = forward_cache(kwargs, output)
    if isinstance(cache, KVCache):
        cache.end_step()


@contextmanager
def attach(model: Any, backend: str | None = None) -> Iterator[ModelAdapter]:
    """Run the model's attention through kvsqueeze (masks from each layer's own cache), without compressing.

    backend: 'sdpa' or 'eager' underneath (default: the model's own when it is one of those, else sdpa).
    """
    adapter = get_adapter(model)
    register()
    previous = model.config._attn_implementation
    _set_attention(model, implementation_name(_inner_backend(previous, backend)))
    handles = [
        model.register_forward_pre_hook(_prepare_step, with_kwargs=True),
        model.register_forward_hook(_end_step, with_kwargs=True),
    ]
    try:
        yield adapter
    finally:
        for handle in handles:
            handle.remove()
        _set_attention(model, previous)

"""What one forward hands from kvsqueeze's attention function to the hooks that run right after it.

transformers calls `KVLayer.update` and then the attention function with the keys it returned; kvsqueeze's attention
needs to know which layer those keys came from (to build the mask from its slot positions), and the compression hook
that runs after the attention module may reuse the queries attention received instead of recomputing them. Both are
handed over here, through context variables, so neither `cache.py` nor `attention.py` imports the hooks above them.
A method's own extra forwards over the cache it is compressing (KVzip's replay) run `paused()`: the hooks skip them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

__all__ = [
    "LayerInputs",
    "capture_queries",
    "capturing_queries",
    "clear_updated",
    "collecting_received",
    "hidden_states_arg",
    "is_paused",
    "keep_received",
    "mark_updated",
    "more_context",
    "more_context_follows",
    "paused",
    "pending_update",
    "take_queries",
    "take_received",
    "take_updated",
    "wants_received",
]

T = TypeVar("T")

_UPDATED: ContextVar[tuple[object, Tensor] | None] = ContextVar("kvsqueeze_updated_layer", default=None)
_PAUSED: ContextVar[bool] = ContextVar("kvsqueeze_paused", default=False)
_MORE: ContextVar[bool] = ContextVar("kvsqueeze_more_context", default=False)


# -- which layer the keys being attended came from
def mark_updated(layer: object, keys: Tensor) -> None:
    """Called by a cache layer's `update`: `keys` (what it returned) are this layer's, for the attention call next."""
    _UPDATED.set((layer, keys))


def pending_update() -> bool:
    """True while a layer was updated and its attention has not taken it yet."""
    return _UPDATED.get() is not None


def take_updated(keys: Tensor) -> object | None:
    """The layer whose `update` returned `keys` just now (consumed), or None if `keys` did not come from one."""
    updated = _UPDATED.get()
    if updated is None or updated[1] is not keys:
        return None
    _UPDATED.set(None)
    return updated[0]


def clear_updated() -> None:
    """Forget an update no attention call took (a new forward starts)."""
    _UPDATED.set(None)


# -- queries captured by attention for the compression hook
@contextmanager
def _setting(var: ContextVar[T], value: T) -> Iterator[None]:
    """`var` holds `value` inside the block and its previous value after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


class _PerLayer:
    """Tensors the attention function leaves, one per layer, for the hook that runs right after it, while a block
    collects them (outside one, nothing is kept)."""

    def __init__(self, name: str) -> None:
        self.var: ContextVar[dict[int, Tensor] | None] = ContextVar(name, default=None)

    def collecting(self) -> AbstractContextManager[None]:
        return _setting(self.var, {})

    def on(self) -> bool:
        return self.var.get() is not None

    def keep(self, layer: object, tensor: Tensor) -> None:
        kept = self.var.get()
        if kept is not None:
            kept[id(layer)] = tensor

    def take(self, layer: object) -> Tensor | None:
        kept = self.var.get()
        return None if kept is None else kept.pop(id(layer), None)


_QUERIES = _PerLayer("kvsqueeze_captured_queries")
_RECEIVED = _PerLayer("kvsqueeze_received_attention")


def capturing_queries() -> AbstractContextManager[None]:
    """Inside this block attention leaves each layer's post-RoPE queries for the hook that runs right after it."""
    return _QUERIES.collecting()


def capture_queries(layer: object, queries: Tensor) -> None:
    """Called by the attention function: keep `queries` (B, H_q, q, D) for `layer` if capturing is on."""
    _QUERIES.keep(layer, queries)


def take_queries(layer: object) -> Tensor | None:
    """The queries captured for `layer` in this forward (consumed), or None."""
    return _QUERIES.take(layer)


# -- attention each slot received, summed by the attention function for the hook (`received.py`)
def collecting_received() -> AbstractContextManager[None]:
    """Inside this block attention over a rectangular layer also sums the attention each slot received and leaves it
    for the hook that runs right after it."""
    return _RECEIVED.collecting()


def wants_received() -> bool:
    return _RECEIVED.on()


def keep_received(layer: object, received: Tensor) -> None:
    """Called by the attention function: keep `received` (B, H_kv, T) for `layer` if collecting is on."""
    _RECEIVED.keep(layer, received)


def take_received(layer: object) -> Tensor | None:
    """The attention `layer`'s slots received in this forward (consumed), or None."""
    return _RECEIVED.take(layer)


# -- a method's own forwards that the hooks must ignore
def paused() -> AbstractContextManager[None]:
    """Inside this block the compression and recording hooks do nothing (a method's own extra forwards)."""
    return _setting(_PAUSED, True)


def is_paused() -> bool:
    return _PAUSED.get()


# -- a chunk of a chunked prefill that more of the context follows
def more_context_follows() -> AbstractContextManager[None]:
    """Around the forward of a chunk that is not the context's last: methods cap protected tokens to the budget of
    the tokens seen so far instead of refusing it (the last chunk's budget is checked as a one-shot prefill's)."""
    return _setting(_MORE, True)


def more_context() -> bool:
    return _MORE.get()


# -- what a layer's hook receives
@dataclass
class LayerInputs:
    """What one attention layer received in a forward: enough to score its cache now or later (a recording)."""

    hidden_states: Tensor  # (B, q, hidden)
    position_embeddings: tuple[Tensor, Tensor]  # cos, sin (B, q, R)
    query_positions: Tensor  # (B, q), -1 = pad
    queries: Tensor | None = None  # (B, H_q, q, D) post-RoPE, when the attention function's were captured
    layer_input: Tensor | None = None  # (B, q, hidden) the decoder layer's input, for methods needing ("residual",)
    attention_update: Tensor | None = None  # (B, q, hidden) what the attention block adds to the residual stream
    received: Tensor | None = None  # (B, H_kv, T) attention each slot received, when the attention function summed it


def hidden_states_arg(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The hidden states a module's forward received, by keyword or as its first positional argument."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

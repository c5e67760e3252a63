"""Record one uncompressed prefill, then compress copies of it with many methods (what the benchmark does).

For a one-shot prefill, compressing a copy of a recording gives exactly what `compress` gives in the forward: each
layer is pruned after its attention ran, so later layers saw the same inputs either way. Methods that act on later
forwards, chunked prefill, or replay the context (`Method.shared_prefill = False`) must run for real instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvsqueeze.cache import KVCache
from kvsqueeze.hooks import attach
from kvsqueeze.methods.base import LayerScores, Method, ModelScopeMethod
from kvsqueeze.models import ModelAdapter
from kvsqueeze.press import CompressionLog, compress_layer, prune_scored, score_layer
from kvsqueeze.rerotation import rerotate_cache
from kvsqueeze.step import LayerInputs, hidden_states_arg, is_paused

__all__ = ["Recording", "compress_recording", "record"]


@dataclass
class Recording:
    """An uncompressed prefill and every full-attention layer's inputs, to compress copies of it later."""

    cache: KVCache
    inputs: dict[int, LayerInputs]
    adapter: ModelAdapter = field(repr=False)


@contextmanager
def record(model: Any, cache: KVCache, backend: str | None = None) -> Iterator[Recording]:
    """Inside this block, forwards fill `cache` uncompressed and the layers' inputs are kept (last forward wins)."""
    with attach(model, backend) as adapter:
        rec = Recording(cache=cache, inputs={}, adapter=adapter)

        def make(layer_idx: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
                pos = cache.layer(layer_idx).query_positions
                if kwargs.get("past_key_values") is cache and pos is not None and not is_paused():
                    hidden = hidden_states_arg(args, kwargs)
                    rec.inputs[layer_idx] = LayerInputs(hidden, kwargs["position_embeddings"], pos)

            return hook

        handles = [
            adapter.attention_modules[i].register_forward_hook(make(i), with_kwargs=True) for i in adapter.full_layers
        ]
        try:
            yield rec
        finally:
            for handle in handles:
                handle.remove()


def compress_recording(recording: Recording, method: Method | None) -> tuple[KVCache, CompressionLog]:
    """A compressed copy of a recorded prefill (the recording itself is left untouched)."""
    rows = torch.arange(recording.cache.batch_size, device=recording.cache.device)
    cache = recording.cache.select_rows(rows)
    log = CompressionLog()
    if isinstance(method, ModelScopeMethod):
        pending: dict[int, LayerScores] = {}
        for layer_idx, inputs in sorted(recording.inputs.items()):
            score_layer(method, recording.adapter, cache, layer_idx, inputs, log, pending)
        prune_scored(method, cache, pending, log)
    elif method is not None:
        for layer_idx, inputs in sorted(recording.inputs.items()):
            compress_layer(method, recording.adapter, cache, layer_idx, inputs, log)
    if method is not None and method.rerotates_keys:
        rerotate_cache(cache, recording.adapter)
    return cache, log

"""`with compress(model, method):` prunes every full-attention layer right after each forward fills it.

Inside `compress`, after every forward each full-attention layer is pruned back to what the method keeps of the
tokens it has seen (one-shot prefill, chunked prefill and, under `model.generate`, decoding alike): the layer's hook
builds a `ScoreContext` from the layer's view, asks the method for a plan, and hands the plan to the cache. A method
with a model-wide budget (`ModelScopeMethod`, e.g. the global budget) scores each layer as it fills and prunes every
layer when the model's forward ends. `compress_layer`, `score_layer` and `prune_scored` are also what
`kvsqueeze.recording` runs over a recorded prefill.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from kvsqueeze import step
from kvsqueeze.cache import KVCache
from kvsqueeze.hooks import attach, forward_cache
from kvsqueeze.methods.base import LayerScores, Method, ModelForward, ModelScopeMethod, ScoreContext
from kvsqueeze.models import ModelAdapter
from kvsqueeze.replay import kvzip_scores
from kvsqueeze.rerotation import rerotate_after_forward
from kvsqueeze.step import LayerInputs, hidden_states_arg

__all__ = ["CompressionLog", "compress", "compress_layer", "prune_scored", "score_context", "score_layer"]


@dataclass
class CompressionLog:
    """What compression did during a `compress` block (measured from the cache's storages)."""

    seconds: float = 0.0
    bytes_before: dict[int, int] = field(default_factory=dict)  # layer -> bytes right before its last pruning
    bytes_after: dict[int, int] = field(default_factory=dict)  # layer -> bytes right after it

    @property
    def kv_bytes_before(self) -> int:
        return sum(self.bytes_before.values())

    @property
    def kv_bytes_after(self) -> int:
        return sum(self.bytes_after.values())


@contextmanager
def compress(model: Any, method: Method | None, backend: str | None = None) -> Iterator[CompressionLog]:
    """Inside this block, every forward prunes each full-attention layer with `method` right after filling it.

    A method with a model-wide budget (`ModelScopeMethod`) scores each layer as it fills and prunes them all when the
    forward ends. Yields a `CompressionLog` (seconds spent compressing, bytes before/after per layer).
    `method=None` only attaches kvsqueeze's attention (no pruning).
    """
    log = CompressionLog()
    received = method is not None and method.uses("received_attention")
    with (
        attach(model, backend) as adapter,
        step.capturing_queries() if method is not None else nullcontext(),
        step.collecting_received() if received else nullcontext(),
    ):
        handles = [] if method is None else _install(model, method, adapter, log)
        try:
            yield log
        finally:
            for handle in handles:
                handle.remove()


def _install(model: Any, method: Method, adapter: ModelAdapter, log: CompressionLog) -> list:
    handles = []
    pending: dict[int, LayerScores] = {}
    residuals: dict[int, Tensor] | None = {} if "residual" in method.needs else None
    for idx in adapter.full_layers:
        hook = _layer_hook(method, adapter, idx, log, pending, residuals)
        handles.append(adapter.attention_modules[idx].register_forward_hook(hook, with_kwargs=True))
        if residuals is not None:
            keep = _keep_layer_input(residuals, idx)
            handles.append(adapter.decoder_layers[idx].register_forward_pre_hook(keep, with_kwargs=True))
    model_hooks = []
    if isinstance(method, ModelScopeMethod):
        model_hooks.append(_model_hook(method, pending, log))
    if method.rerotates_keys:
        model_hooks.append(rerotate_after_forward(adapter))
    # prepended (so still in this order): they run before `attach`'s end of step, which quantizes a quantized cache's
    # new tokens; a model-wide plan must prune them first, in full precision
    for hook in reversed(model_hooks):
        handles.append(model.register_forward_hook(hook, with_kwargs=True, prepend=True))
    return handles


@contextmanager
def _timed(device: torch.device, log: CompressionLog) -> Iterator[None]:
    sync = device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync:
            torch.cuda.synchronize(device)
        log.seconds += time.perf_counter() - start


def score_context(adapter: ModelAdapter, cache: KVCache, layer_idx: int, inputs: LayerInputs) -> ScoreContext | None:
    """What a method sees of layer `layer_idx` after a forward with `inputs` (None if the layer is empty)."""
    layer = cache.layer(layer_idx)
    if layer.storage is None or layer.seen is None:
        return None
    keys, values, positions = layer.view()  # rectangular (a transient copy when the layer is ragged)
    return ScoreContext(
        keys=keys,
        values=values,
        positions=positions,
        hidden_states=inputs.hidden_states,
        query_positions=inputs.query_positions,
        position_embeddings=inputs.position_embeddings,
        captured_queries=inputs.queries,
        received=inputs.received,
        layer_input=inputs.layer_input,
        attention_update=inputs.attention_update,
        slot_store=layer,
        seen=layer.seen,
        layer_idx=layer_idx,
        module=adapter.attention_modules[layer_idx],
        adapter=adapter,
        more_context=step.more_context(),
    )


def _apply(
    cache: KVCache,
    layer_idx: int,
    plan: tuple[Tensor, Tensor] | None,
    log: CompressionLog,
    channels: Tensor | None = None,
    values: Tensor | None = None,
) -> None:
    layer = cache.layer(layer_idx)
    log.bytes_before[layer_idx] = layer.nbytes()
    if plan is not None:
        layer.prune(*plan, values=values)
    if channels is not None:  # thin keys (Method.channel_plan), after the token plan
        layer.prune_key_channels(channels)
    log.bytes_after[layer_idx] = layer.nbytes()


def compress_layer(
    method: Method, adapter: ModelAdapter, cache: KVCache, layer_idx: int, inputs: LayerInputs, log: CompressionLog
) -> None:
    """Score and prune one full-attention layer of `cache` with `method`, logging bytes and time."""
    ctx = score_context(adapter, cache, layer_idx, inputs)
    if ctx is None:
        return
    with _timed(ctx.keys.device, log), torch.no_grad():
        plan = method.plan(ctx)
        channels = method.channel_plan(ctx, plan) if cache.layer(layer_idx).thin is None else None
        values = method.merge_values(ctx, *plan) if plan is not None and method.merges_values else None
        del ctx
        _apply(cache, layer_idx, plan, log, channels, values)


def score_layer(
    method: ModelScopeMethod,
    adapter: ModelAdapter,
    cache: KVCache,
    layer_idx: int,
    inputs: LayerInputs,
    log: CompressionLog,
    pending: dict[int, LayerScores],
) -> None:
    """Score one layer for a model-wide budget; it is pruned later by `prune_scored`."""
    ctx = score_context(adapter, cache, layer_idx, inputs)
    if ctx is None:
        return
    with _timed(ctx.keys.device, log), torch.no_grad():
        pending[layer_idx] = method.layer_scores(ctx)


def prune_scored(
    method: ModelScopeMethod, cache: KVCache, pending: dict[int, LayerScores], log: CompressionLog
) -> None:
    """Plan the model-wide budget over every scored layer and prune them all (then forget the scores)."""
    if not pending:
        return
    with _timed(cache.device, log), torch.no_grad():
        plans = method.plan_model(pending)
        pending.clear()
        for layer_idx, plan in sorted(plans.items()):
            _apply(cache, layer_idx, plan, log)


def _keep_layer_input(residuals: dict[int, Tensor], layer_idx: int):
    """Forward pre-hook of a decoder layer: keep its input (the residual stream) for the layer's attention hook."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        residuals[layer_idx] = hidden_states_arg(args, kwargs)

    return hook


def _layer_hook(
    method: Method,
    adapter: ModelAdapter,
    layer_idx: int,
    log: CompressionLog,
    pending: dict[int, LayerScores],
    residuals: dict[int, Tensor] | None = None,
):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, KVCache) or step.is_paused():
            return
        layer = cache.layer(layer_idx)
        if layer.query_positions is None:
            return
        queries = step.take_queries(layer)
        inputs = LayerInputs(hidden_states_arg(args, kwargs), kwargs["position_embeddings"], layer.query_positions)
        inputs.queries = queries
        inputs.received = step.take_received(layer)
        if residuals is not None:  # methods that need ("residual",): the stream before and the block's update
            inputs.layer_input = residuals.pop(layer_idx, None)
            attn_output = output[0] if isinstance(output, tuple) else output
            inputs.attention_update = adapter.attention_update(layer_idx, attn_output)
        if isinstance(method, ModelScopeMethod):
            score_layer(method, adapter, cache, layer_idx, inputs, log, pending)
        else:
            compress_layer(method, adapter, cache, layer_idx, inputs, log)

    return hook


def _model_hook(method: ModelScopeMethod, pending: dict[int, LayerScores], log: CompressionLog):
    def hook(model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if step.is_paused():
            return
        cache = forward_cache(kwargs, output)
        if isinstance(cache, KVCache):
            if pending:
                with _timed(cache.device, log), torch.no_grad():
                    method.before_plan(_model_forward(model, cache, kwargs), pending)
            prune_scored(method, cache, pending, log)
        pending.clear()

    return hook


def _model_forward(model: nn.Module, cache: KVCache, kwargs: dict[str, Any]) -> ModelForward:
    """What a model-wide method may use when the forward ends: its inputs, and a replay of them over the cache."""
    ids = kwargs.get("input_ids")
    added = 0 if ids is None else int(ids.shape[1])
    first = cache.full_layers()[0] if cache.full_layers() else None
    before = 0 if first is None else first.total_seen - added
    return ModelForward(
        model=model,
        input_ids=ids,
        attention_mask=kwargs.get("attention_mask"),
        tokens_before=before,
        replay=partial(kvzip_scores, model, cache),
    )

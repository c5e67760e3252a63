"""Context replay: how much attention each cached pair receives while the model repeats the context (KVzip's score).

KVzip (Kim, Kim, Kwon et al. 2025, arXiv 2505.23416) rates a cached key/value pair by the attention it gets while the
model reconstructs the context from the cache: after the prefill of context c, the model reads (teacher-forced)

    replay = prompt ids ("Repeat the previous context exactly.") + c again

on top of the uncompressed cache. For every full-attention layer, KV head h and context slot i:

    kvzip    s_i = max over replay queries j and the G query heads q of head h of  a_{q,j,i}
    kvzip+   s_i = max over j and q of  a_{q,j,i} * ||v_i W_O^q||_2 / ||h_j||_2        (KVzap, arXiv 2601.07891)

    kvgrad   s_i = max over j and q of  a_{q,j,i} * ||v_i W_O^q||_2 * ||d Phi / d o_j||_2     (KVgrad, see below)

a_{q,j,i} = softmax over every key query j sees (the context and the replay tokens up to j, causal; pads never);
W_O^q (D x hidden) is the slice of the output projection query head q writes through; h_j is the input of the
attention block for replay token j (after the input norm).

KVgrad (OpenReview cg1wTCJjjk) weighs each replay query by how much a hidden-state objective depends on what the
layer's attention writes for it: Phi = sum over the chunk's real replay tokens j of ||x_j^L||_2^2, x^L the output of
the last decoder layer (before the final norm), and o_j the output of the layer's attention block (after o_proj).
The paper differentiates the pre-MLP residual stream a_j = x_j + o_j; for every family where the attention output is
added to the residual as is (Llama, Mistral, Qwen, Phi3) d Phi / d o_j = d Phi / d a_j exactly; Gemma's
post-attention norm sits in between, and the gradient is taken where v W_O lives, at o_j. One backward pass per
replay chunk (`torch.autograd.grad` with the model's parameters frozen meanwhile, restored after): the replay
tokens of earlier chunks are detached, so the gradient only flows inside a chunk and the scores depend on
`chunk_size` (one chunk: the exact gradient of the whole replay's Phi). Memory: on top of kvzip's replay, one
chunk's autograd graph through every layer, about chunk x (10 x hidden + 3 x intermediate) floats per layer, plus
chunk x T x H_q where the attention backend keeps its probabilities (eager; T = context + replay so far). Measured
on SmolLM2-135M (CPU, float32, 1k-token context, chunk 256): 562 MiB peak added by the compression against 307 MiB
for kvzip. The cached context is never part of the graph (no grad flags are set on it) and is left as it was.

The replay runs in chunks of `chunk_size` tokens through the model's decoder (no LM head); each layer's attention to
the context is computed from the post-RoPE queries the attention function captured, one (chunk x T) block at a time,
and folded into a running max. Afterwards every layer is put back as it was (same tensors, positions, `seen`): the
cache holds the prefill again. The replay's keys/values are held while it runs (about twice the context's KV), and
the cache's peak-bytes tracker keeps that peak.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from kvsqueeze import step
from kvsqueeze.cache import KVCache
from kvsqueeze.calibration.collect import find_tokenizer
from kvsqueeze.calibration.store import remembered
from kvsqueeze.hooks import attach, is_attached
from kvsqueeze.layer import KVLayer
from kvsqueeze.models import apply_rope, get_adapter
from kvsqueeze.replay_scoring import LayerScorer, ReplayGradients
from kvsqueeze.validation import check_choice, check_int

logger = logging.getLogger("kvsqueeze")

VARIANTS = ("kvzip", "kvzip+")  # attention-only replays
KVGRAD = "kvgrad"  # the replay with one backward pass per chunk
DEFAULT_PROMPT = "\n\nRepeat the previous context exactly.\n"

__all__ = ["DEFAULT_PROMPT", "KVGRAD", "VARIANTS", "kvzip_scores", "prompt_token_ids", "replay_document"]


def prompt_token_ids(model: nn.Module, prompt: str = DEFAULT_PROMPT, tokenizer: Any = None) -> list[int]:
    """The replay prompt as token ids (no special tokens), with `tokenizer` or the one saved with the model.

    Without any tokenizer (e.g. a model built from a config) the prompt is left out: the replay is the context alone,
    and a warning says so."""
    if tokenizer is not None:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def load() -> list[int]:
        found = find_tokenizer(model)
        if found is None:
            logger.warning("No tokenizer found for the model: the context replay runs without its prompt %r.", prompt)
            return []
        return list(found(prompt, add_special_tokens=False)["input_ids"])

    return remembered(model, ("replay_prompt", prompt), load)


def _check(variant: str, chunk_size: int) -> None:
    check_choice("variant", variant, (*VARIANTS, KVGRAD))
    check_int("chunk_size", chunk_size, 1, 1_000_000)


def _replay_batch(
    context_ids: Tensor, valid: Tensor, prompt: list[int], start: Tensor, right: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded replay rows (prompt + the row's real context ids): ids (B, L), valid (B, L), positions (B, L)
    continuing from `start` (B,), the position of each row's next token. `right`: pads on the right instead, so every
    row's chunks start where they would if the row ran alone (kvgrad's gradient stops at chunk boundaries)."""
    rows = [torch.cat([context_ids.new_tensor(prompt), context_ids[b][valid[b]]]) for b in range(len(context_ids))]
    width = max(len(r) for r in rows)
    ids = context_ids.new_zeros(len(rows), width)
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=context_ids.device)
    for b, row in enumerate(rows):
        cols = slice(0, len(row)) if right else slice(width - len(row), width)
        ids[b, cols] = row
        real[b, cols] = True
    positions = start.to(ids.device)[:, None] + real.long().cumsum(dim=1) - 1
    return ids, real, torch.where(real, positions, 0)


@contextmanager
def _restored(cache: KVCache) -> Iterator[None]:
    """Put every layer (and the bytes tracker's current total, not its peak) back as it was on exit."""
    snapshot = cache.snapshot()
    try:
        yield
    finally:
        cache.restore(snapshot)


def _chunk_queries(scorer: LayerScorer, layer: KVLayer, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The post-RoPE queries (B, H_q, c, D) of the chunk the layer just attended with (captured, else recomputed)."""
    queries = step.take_queries(layer)
    if queries is None:  # not captured (another attention function): recompute them
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        queries = apply_rope(scorer.adapter.pre_rope_queries(module, hidden), cos, sin)
    return queries


def _hook(scorer: LayerScorer, cache: KVCache, gradients: ReplayGradients | None):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        layer = cache.layer(scorer.idx)
        queries = _chunk_queries(scorer, layer, module, args, kwargs)
        if gradients is not None:  # kvgrad: the query weights come after the chunk's backward pass
            gradients.outputs[scorer.idx] = (queries.detach(), output[0] if isinstance(output, tuple) else output)
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        scorer.update(layer, queries, -hidden.float().norm(dim=-1).clamp(min=1e-12).log() if scorer.plus else None)

    return hook


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient (nor the activations kept for one) while KVgrad differentiates; restored on exit."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_differentiable(cache: KVCache) -> None:
    if torch.is_inference_mode_enabled() or any(
        layer.keys is not None and layer.keys.is_inference() for layer in cache.kv_layers()
    ):
        raise ValueError(
            "kvgrad differentiates the replay: run the prefill and the compression outside torch.inference_mode() "
            "(torch.no_grad() is fine)"
        )


def _context_rows(cache: KVCache, context_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, n) bool real context tokens; checks that the cache holds exactly this context."""
    if context_ids.dim() != 2:
        raise ValueError(f"context_ids must be (batch, tokens), got shape {tuple(context_ids.shape)}")
    valid = torch.ones_like(context_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if valid.shape != context_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != context_ids shape {tuple(context_ids.shape)}")
    seen = cache.real_tokens_seen()
    real = valid.sum(dim=1).to(seen.device) if seen is not None else None
    if seen is None or real is None or not torch.equal(seen, real):
        held = None if seen is None else seen.tolist()
        raise ValueError(
            f"the cache must hold exactly the context being replayed: it has seen {held} tokens per row, the context "
            f"has {valid.sum(dim=1).tolist()} real tokens (prefill the context into an empty cache first)"
        )
    return valid


@torch.no_grad()
def kvzip_scores(
    model: Any,
    cache: KVCache,
    context_ids: Tensor,
    variant: str = "kvzip",
    *,
    attention_mask: Tensor | None = None,
    prompt_ids: list[int] | None = None,
    chunk_size: int = 256,
) -> dict[int, Tensor]:
    """KVzip (or KVzip+) scores of every cached context pair, from a replay of the context (see the module docstring).

    model: the causal LM that prefilled `cache`; cache: a KVCache holding exactly the context `context_ids` (B, n)
    (left-padded; `attention_mask` (B, n) 1 = real token, default all real); variant "kvzip", "kvzip+" or "kvgrad"
    (one backward pass per chunk, see the module docstring); prompt_ids:
    the replay prompt (default: `DEFAULT_PROMPT` with the model's tokenizer); chunk_size: replay tokens per forward.

    Returns {full-attention layer index: scores (B, H_kv, T) float32}, slot for slot as `cache.layer(i).view()`
    (higher = more needed to repeat the context; 0 on empty/pad slots). Scores are attention probabilities (kvzip+:
    rescaled by norms; kvgrad: by value and gradient norms, unbounded), comparable across layers and heads; learned
    predictors usually fit their log. The cache is left exactly as it was (the same tensors); only its peak-bytes
    record keeps the replay's extra tokens.
    """
    _check(variant, chunk_size)
    if not isinstance(cache, KVCache):
        raise TypeError(f"kvzip_scores needs a kvsqueeze KVCache, got {type(cache).__name__}")
    if variant == KVGRAD:
        _check_differentiable(cache)
    valid = _context_rows(cache, context_ids, attention_mask)
    start = cache.next_positions()
    assert start is not None
    adapter = get_adapter(model)
    prompt = prompt_token_ids(model) if prompt_ids is None else [int(t) for t in prompt_ids]
    ids, real, positions = _replay_batch(context_ids, valid.to(context_ids.device), prompt, start, variant == KVGRAD)
    scorers = [LayerScorer(adapter, i, cache.layer(i), variant) for i in adapter.full_layers]
    attached = is_attached(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    gradients = ReplayGradients(scorers, cache) if variant == KVGRAD else None
    handles = [
        adapter.attention_modules[s.idx].register_forward_hook(_hook(s, cache, gradients), with_kwargs=True)
        for s in scorers
    ]
    if gradients is not None:
        handles.append(adapter.decoder_layers[-1].register_forward_hook(gradients.last_hook))
    try:
        with (
            step.paused(),
            step.capturing_queries(),
            nullcontext() if attached else attach(model),
            _restored(cache),
            nullcontext() if gradients is None else _frozen(model),
        ):
            for lo in range(0, ids.shape[1], chunk_size):
                hi = lo + chunk_size
                cache.begin_step(positions[:, lo:hi], real[:, lo:hi])
                if gradients is None:
                    decoder(
                        input_ids=ids[:, lo:hi], position_ids=positions[:, lo:hi], past_key_values=cache, use_cache=True
                    )
                else:
                    with torch.enable_grad():  # one graph per chunk, from a leaf embedding (parameters are frozen)
                        embeds = model.get_input_embeddings()(ids[:, lo:hi]).detach().requires_grad_(True)
                        chunk = {"position_ids": positions[:, lo:hi], "past_key_values": cache, "use_cache": True}
                        decoder(inputs_embeds=embeds, **chunk)
                        gradients.backward(real[:, lo:hi])
                cache.end_step()
    finally:
        for handle in handles:
            handle.remove()
    return {s.idx: s.scores() for s in scorers}


@torch.no_grad()
def replay_document(model: Any, ids: Tensor, variant: str = "kvzip+") -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Prefill one document (1-D ids) alone into a fresh cache and replay it (the training data of learned KVzip+
    predictors). Returns, per full-attention layer, the attention block's input (n, hidden) float32 on the CPU and
    the document's replay scores (H, n). Runs paused, so it may run inside a compressed forward."""
    adapter = get_adapter(model)
    row = ids[None].to(next(model.parameters()).device)
    cache = KVCache(model.config)
    inputs: dict[int, Tensor] = {}

    def keep(i: int):
        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            inputs[i] = step.hidden_states_arg(args, kwargs)[0].float().cpu()

        return pre

    modules = adapter.attention_modules
    handles = [modules[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in adapter.full_layers]
    try:
        with step.paused(), nullcontext() if is_attached(model) else attach(model):
            model(input_ids=row, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    with step.paused():
        scores = kvzip_scores(model, cache, row, variant=variant)
    return inputs, {i: scores[i][0] for i in adapter.full_layers}

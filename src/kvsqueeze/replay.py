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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kvsqueeze.cache import KVCache, KVLayer, capturing_queries
from kvsqueeze.models import ModelAdapter, apply_rope, get_adapter

logger = logging.getLogger("kvsqueeze")

VARIANTS = ("kvzip", "kvzip+")  # attention-only replays
KVGRAD = "kvgrad"  # the replay with one backward pass per chunk
DEFAULT_PROMPT = "\n\nRepeat the previous context exactly.\n"

__all__ = ["DEFAULT_PROMPT", "KVGRAD", "VARIANTS", "kvzip_scores", "prompt_token_ids"]


def prompt_token_ids(model: nn.Module, prompt: str = DEFAULT_PROMPT, tokenizer: Any = None) -> list[int]:
    """The replay prompt as token ids (no special tokens), with `tokenizer` or the one saved with the model.

    Without any tokenizer (e.g. a model built from a config) the prompt is left out: the replay is the context alone,
    and a warning says so."""
    from kvsqueeze.calibration.collect import find_tokenizer
    from kvsqueeze.calibration.store import remembered

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
    if variant not in (*VARIANTS, KVGRAD):
        raise ValueError(f"variant must be one of {(*VARIANTS, KVGRAD)}, got {variant!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= 1_000_000:
        raise ValueError(f"chunk_size must be an integer in [1, 1000000], got {chunk_size!r}")


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


@dataclass
class _LayerState:
    """What a replay forward changes on one layer (every change replaces tensors, so references restore it)."""

    keys: Tensor | None
    values: Tensor | None
    positions: Tensor | None
    seen: Tensor | None
    lengths: Tensor | None
    total_seen: int

    @classmethod
    def of(cls, layer: KVLayer) -> _LayerState:
        return cls(layer.keys, layer.values, layer.positions, layer.seen, layer.lengths, layer.total_seen)

    def restore(self, layer: KVLayer) -> None:
        layer.keys, layer.values, layer.positions = self.keys, self.values, self.positions
        layer.seen, layer.lengths, layer.total_seen = self.seen, self.lengths, self.total_seen
        layer.step_keys = layer.step_values = layer.step_positions = layer.step_queries = None
        layer.query_positions = None


@contextmanager
def _restored(cache: KVCache) -> Iterator[None]:
    """Put every layer (and the bytes tracker's current total, not its peak) back as it was on exit."""
    states = [_LayerState.of(layer) for layer in cache.kv_layers()]
    current = cache.tracker.current
    try:
        yield
    finally:
        for layer, state in zip(cache.kv_layers(), states, strict=True):
            state.restore(layer)
        cache.tracker.current = current
        cache.step_positions = None


class _LayerScorer:
    """Running max, over the replay chunks, of the attention one layer's context slots receive: (B, H_q, T0)."""

    def __init__(self, adapter: ModelAdapter, idx: int, layer: KVLayer, variant: str) -> None:
        keys, values, positions = layer.view()
        self.adapter, self.idx, self.plus = adapter, idx, variant == "kvzip+"
        self.module = adapter.attention_modules[idx]
        self.context = positions >= 0  # (B, H, T0) the real slots before the replay
        b, h, t0 = positions.shape
        self.best = torch.zeros(b, adapter.n_q_heads, t0, dtype=torch.float32, device=keys.device)
        self.wov: Tensor | None = None
        if variant != "kvzip":  # ||v_i W_O^q||_2 = sqrt(v^T (W_q W_q^T) v) per query head q: (B, H, G, T0)
            w = adapter.output_projection(self.module).float()  # (H_q, D, hidden)
            gram = (w @ w.transpose(1, 2)).view(h, adapter.group_size, w.shape[1], w.shape[1])  # (H, G, D, D)
            v = values.float()
            self.wov = torch.einsum("bhtd,hgde,bhte->bhgt", v, gram, v).clamp(min=0).sqrt()

    def update(self, layer: KVLayer, queries: Tensor, log_scale: Tensor | None = None) -> None:
        """Fold one replay chunk in: queries (B, H_q, c, D) post-RoPE; log_scale (B, c) the log of a positive weight
        per replay query (kvzip+: -log||h_j||, kvgrad: log of the gradient norm), None for 1.

        max_j w_j a_ji = exp(max_j (l_ji - lse_j + log w_j)) (exp is monotonic), so only the logits, their logsumexp
        and one max are computed. Pad queries get lse = +inf: they add zeros."""
        keys, _, positions = layer.view()  # the context slots first, then the replay so far
        qpos = layer.query_positions
        assert qpos is not None
        b, hq, c, d = queries.shape
        h, t = keys.shape[1], keys.shape[2]
        t0 = self.context.shape[-1]
        scaling = float(getattr(self.module, "scaling", d**-0.5))
        q = queries.float().reshape(b, h, (hq // h) * c, d) * scaling
        logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(b, h, hq // h, c, t)  # (B, H, G, c, T)
        softcap = self.adapter.softcap(self.module)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        qp = qpos.to(positions.device)
        if not bool(self.context.all()):  # empty context slots (left pads): never attended
            logits[..., :t0].masked_fill_(~self.context[:, :, None, None, :], float("-inf"))
        pos = positions[:, :, t0:][:, :, None, None, :]  # (B, H, 1, 1, T - T0) the replay so far: causal
        logits[..., t0:].masked_fill_((pos < 0) | (pos > qp[:, None, None, :, None]), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # (B, H, G, c)
        if log_scale is not None:
            lse = lse - log_scale.float()[:, None, None, :]
        lse = lse.masked_fill((qp < 0)[:, None, None, :], float("inf"))
        chunk = (logits[..., :t0] - lse[..., None]).amax(dim=3).exp().reshape(b, hq, t0)
        self.best = torch.maximum(self.best, chunk)
        del logits

    def scores(self) -> Tensor:
        """(B, H, T0): max over the GQA group (after the W_O value norms for kvzip+); 0 on empty slots."""
        b, hq, t0 = self.best.shape
        h = self.context.shape[1]
        best = self.best.view(b, h, hq // h, t0)
        if self.wov is not None:
            best = best * self.wov
        return best.amax(dim=2).masked_fill(~self.context, 0.0)


def _chunk_queries(scorer: _LayerScorer, layer: KVLayer, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The post-RoPE queries (B, H_q, c, D) of the chunk the layer just attended with (captured, else recomputed)."""
    queries, layer.step_queries = layer.step_queries, None
    if queries is None:  # not captured (another attention function): recompute them
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        queries = apply_rope(scorer.adapter.pre_rope_queries(module, hidden), cos, sin)
    return queries


def _hook(scorer: _LayerScorer, cache: KVCache, gradients: _Gradients | None):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        layer = cache.layer(scorer.idx)
        queries = _chunk_queries(scorer, layer, module, args, kwargs)
        if gradients is not None:  # kvgrad: the query weights come after the chunk's backward pass
            gradients.outputs[scorer.idx] = (queries.detach(), output[0] if isinstance(output, tuple) else output)
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        scorer.update(layer, queries, -hidden.float().norm(dim=-1).clamp(min=1e-12).log() if scorer.plus else None)

    return hook


class _Gradients:
    """KVgrad's chunk step: what the forward leaves (each scored layer's queries and attention output o, the last
    decoder layer's output x^L), then one backward pass of Phi = sum_j ||x_j^L||^2 to weigh query j by ||dPhi/do_j||."""

    def __init__(self, scorers: list[_LayerScorer], cache: KVCache) -> None:
        self.scorers, self.cache = scorers, cache
        self.outputs: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (queries (B, H_q, c, D), o (B, c, hidden))
        self.last: Tensor | None = None  # (B, c, hidden) x^L

    def last_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.last = output[0] if isinstance(output, tuple) else output

    def backward(self, real: Tensor) -> None:
        """real (B, c): the chunk's real replay tokens (pads join neither Phi nor the scores)."""
        assert self.last is not None
        phi = (self.last.float().pow(2).sum(dim=-1) * real.to(self.last.device)).sum()
        order = [s for s in self.scorers if s.idx in self.outputs]
        grads = torch.autograd.grad(phi, [self.outputs[s.idx][1] for s in order], allow_unused=True)
        with torch.no_grad():
            for scorer, grad in zip(order, grads, strict=True):
                queries, out = self.outputs[scorer.idx]
                norm = torch.zeros(out.shape[:2], device=out.device) if grad is None else grad.float().norm(dim=-1)
                scorer.update(self.cache.layer(scorer.idx), queries, norm.log())
        self.outputs.clear()
        self.last = None
        for layer in self.cache.kv_layers():  # the next chunk reads this chunk's replay pairs without their graph
            layer.keys = None if layer.keys is None else layer.keys.detach()
            layer.values = None if layer.values is None else layer.values.detach()


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
    from kvsqueeze.press import attach, paused  # press imports the methods package, which imports this module

    adapter = get_adapter(model)
    prompt = prompt_token_ids(model) if prompt_ids is None else [int(t) for t in prompt_ids]
    ids, real, positions = _replay_batch(context_ids, valid.to(context_ids.device), prompt, start, variant == KVGRAD)
    scorers = [_LayerScorer(adapter, i, cache.layer(i), variant) for i in adapter.full_layers]
    attached = str(getattr(model.config, "_attn_implementation", "")).startswith("kvsqueeze_")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    gradients = _Gradients(scorers, cache) if variant == KVGRAD else None
    handles = [
        adapter.attention_modules[s.idx].register_forward_hook(_hook(s, cache, gradients), with_kwargs=True)
        for s in scorers
    ]
    if gradients is not None:
        handles.append(adapter.decoder_layers[-1].register_forward_hook(gradients.last_hook))
    try:
        with (
            paused(),
            capturing_queries(),
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
                        step = {"position_ids": positions[:, lo:hi], "past_key_values": cache, "use_cache": True}
                        decoder(inputs_embeds=embeds, **step)
                        gradients.backward(real[:, lo:hi])
                cache.end_step()
    finally:
        for handle in handles:
            handle.remove()
    return {s.idx: s.scores() for s in scorers}

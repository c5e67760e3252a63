"""Attention over a compressed cache, registered through transformers' AttentionInterface.

transformers builds one mask for all layers from the first layer's length. After compression, layers, rows and heads
hold different numbers of tokens, so kvsqueeze registers its own attention functions (`kvsqueeze_sdpa`,
`kvsqueeze_eager`) that build each layer's mask from that layer's own slot positions:

    a query at position p may attend a slot at position s  iff  s >= 0 (filled) and s <= p
                                                                 (and p - s < window on sliding layers)

Because these names are unknown to transformers' mask registry, the model skips building its own mask (returns None)
and the whole decision is made here. Pad queries attend to themselves only, so no row is fully masked (no NaNs).

A layer storing thin keys (D' < D key channels, `cache.py`) is attended with the matching channels of the queries,
scaled by 1/sqrt(D) as the model would (`_thin_queries`). A layer whose rows read shared prefixes (`storage/shared.py`)
is attended by `prefix_attention`: the keys transformers hands over are then the rows' own slots only. Inside
`compress` with a method that uses the attention each slot received (observed attention, H2O), a rectangular layer is
attended by `received.attend` instead of SDPA, which sums it on the way for the method's hook (under the eager backend
the method computes it itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from kvsqueeze import prefix_attention, received, step
from kvsqueeze.layer import KVLayer
from kvsqueeze.storage import DenseStorage, SharedStorage

BACKENDS = ("sdpa", "eager")
PREFIX = "kvsqueeze_"  # kvsqueeze's attention functions are registered as PREFIX + backend
_registered = False


def implementation_name(backend: str) -> str:
    """The attn_implementation name kvsqueeze registers for an inner backend ('sdpa' or 'eager')."""
    if backend not in BACKENDS:
        raise ValueError(f"Unsupported attention backend {backend!r}; kvsqueeze runs over one of {BACKENDS}.")
    return f"{PREFIX}{backend}"


def register() -> None:
    """Register kvsqueeze's attention functions with transformers (idempotent; called by `attach`)."""
    global _registered
    if _registered:
        return
    AttentionInterface.register(implementation_name("sdpa"), _sdpa_forward)
    AttentionInterface.register(implementation_name("eager"), _eager_forward)
    _registered = True


def layer_mask(layer: KVLayer, q_len: int) -> Tensor | str | None:
    """Mask for the current step of `layer`: bool (B, 1 or H_kv, q, T), "causal", or None (attend to all)."""
    pos = layer.step_view[2] if layer.step_view is not None else layer.positions
    assert pos is not None and layer.tokens is not None  # pos (B, H, T): the rectangular form read now
    tokens = layer.tokens
    return step_mask(pos, tokens.positions.to(pos.device), q_len, layer.sliding_window, tokens.all_real)


def step_mask(
    pos: Tensor, qpos: Tensor, q_len: int, window: int | None = None, all_real: bool | None = None
) -> Tensor | str | None:
    """Mask of one step from the slot positions pos (B, H, T) (the q new slots last) and the query positions qpos
    (B, q), -1 = empty slot / pad query: bool (B, 1 or H, q, T), "causal", or None (attend to all). all_real: whether
    qpos holds no pad, when the caller knows it already (else it is read from qpos)."""
    t_past = pos.shape[-1] - q_len
    past = pos[..., :t_past]
    past_full = t_past == 0 or int(past.min()) >= 0
    new_full = bool((qpos >= 0).all()) if all_real is None else all_real
    if window is not None and _span(pos, qpos) < window:
        window = None  # the window cuts nothing yet
    if window is None and past_full and new_full:
        if t_past == 0:
            return "causal" if q_len > 1 else None
        if q_len == 1:
            return None
    return _general_mask(past, qpos, window)


def _span(pos: Tensor, qpos: Tensor) -> int:
    filled = pos[pos >= 0]
    if filled.numel() == 0:
        return 0
    return int(qpos.max()) - int(filled.min())


def _general_mask(past: Tensor, qpos: Tensor, window: int | None) -> Tensor:
    b, _, t_past = past.shape
    q_len = qpos.shape[1]
    if window is not None or bool((past >= 0).eq((past >= 0)[:, :1]).all()):
        past = past[:, :1]  # validity is the same for every head (always so on never-pruned sliding layers)
    pm = (past >= 0)[:, :, None, :]  # (B, Hm, 1, T_past)
    if window is not None:
        pm = pm & (qpos[:, None, :, None] - past[:, :, None, :] < window)
    idx = torch.arange(q_len, device=qpos.device)
    causal = idx[None, :] <= idx[:, None]  # (q, q)
    nm = causal[None] & ((qpos >= 0)[:, None, :] | torch.eye(q_len, dtype=torch.bool, device=qpos.device)[None])
    if window is not None:
        nm = nm & (qpos[:, :, None] - qpos[:, None, :] < window)
    hm = pm.shape[1]
    return torch.cat([pm.expand(b, hm, q_len, t_past), nm[:, None].expand(b, hm, q_len, q_len)], dim=-1)


def _fallback_mask(attention_mask: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Tensor | str | None:
    """For keys that did not come from a KVCache (no cache, or another cache): plain causal, bottom-right aligned."""
    if attention_mask is not None:
        return attention_mask
    if q_len == 1:
        return None
    if q_len == k_len:
        return "causal"
    idx_q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return (torch.arange(k_len, device=device)[None, :] <= idx_q)[None, None]


def _mask_for(query: Tensor, key: Tensor, attention_mask: Tensor | None) -> tuple[Tensor | str | None, KVLayer | None]:
    layer = step.take_updated(key)
    if not isinstance(layer, KVLayer):
        return _fallback_mask(attention_mask, query.shape[-2], key.shape[-2], query.device), None
    if not layer.is_sliding:  # sliding layers are never scored
        step.capture_queries(layer, query)
    return layer_mask(layer, query.shape[-2]), layer


def _thin_queries(layer: KVLayer | None, query: Tensor, scaling: float | None) -> tuple[Tensor, float | None]:
    """Queries restricted to the key channels a layer keeps, and the scale of the full head dim."""
    if layer is None or layer.thin is None:
        return query, scaling
    return layer.gather_query_channels(query), scaling if scaling is not None else query.shape[-1] ** -0.5


def _shared_forward(layer: KVLayer | None, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | str | None,
                    scaling: float | None, softcap: float | None) -> Tensor | None:  # fmt: skip
    """(B, q, H_q, Dv) attention of a layer whose rows read shared prefixes; None for any other layer."""
    if layer is None or not isinstance(layer.storage, SharedStorage):
        return None
    joined = layer.storage.joined() if mask is None and softcap is None else None
    if joined is not None:  # own slots right after the prefix's in memory: one rectangle, as a plain layer's
        out = grouped_sdpa(query, *joined, None, 0.0, scaling)
        layer.finish_step()
        return out.transpose(1, 2).contiguous()
    if isinstance(mask, str):  # "causal": the own slots are the new tokens only
        q_len = query.shape[-2]
        mask = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()[None, None]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = prefix_attention.attend(query, layer.storage.prefix_reads(), key, value, mask, scale, softcap)
    layer.finish_step()
    return out.transpose(1, 2).contiguous()


def _received_forward(layer: KVLayer | None, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | str | None,
                      scaling: float | None, softcap: float | None) -> Tensor | None:  # fmt: skip
    """(B, q, H_q, Dv) attention of a rectangular layer whose slots' received attention a method needs
    (`received.py`), left for its hook; None when not collecting or for any other layer."""
    if layer is None or not step.wants_received() or layer.is_sliding or not isinstance(layer.storage, DenseStorage):
        return None
    assert layer.query_positions is not None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    real = layer.query_positions >= 0
    out, summed = received.attend(query, key, value, mask, scale, real, softcap)
    step.keep_received(layer, summed)
    layer.finish_step()
    return out.transpose(1, 2).contiguous()


def expand_heads(mask: Tensor, n_q_heads: int) -> Tensor:
    """Per-KV-head masks (B, H_kv, q, T) -> per-query-head (B, H_q, q, T); broadcastable masks pass through."""
    if mask.dim() == 4 and mask.shape[1] not in (1, n_q_heads):
        return mask.repeat_interleave(n_q_heads // mask.shape[1], dim=1)
    return mask


def balanced(device: torch.device, items: int) -> bool:
    """Whether `items` work items of a fused attention call keep every CPU thread busy to the end (the thread count
    divides them); always True off the CPU, where the kernels schedule blocks, not threads."""
    return device.type != "cpu" or items % torch.get_num_threads() == 0


def grouped_sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | str | None, dropout: float,
                 scale: float | None) -> Tensor:  # fmt: skip
    """SDPA of queries (B, H_q, q, D) over keys/values (B, H_kv, T, ...) under `mask` (bool or additive (B, 1 or H_kv,
    q, T), "causal" or None): (B, H_q, q, Dv).

    A one-token step under grouped-query attention runs with each KV head's query heads as the rows of one (B, H_kv,
    H_q / H_kv, D) query, so each KV head's keys and values are read once. On one thread PyTorch's CPU kernel under
    `enable_gqa` is slower: 1.90-2.32x the grouped call at Llama-3.1-8B's heads (8 KV, 32 query, dim 128) and 1.12x at
    SmolLM2's (3, 9, 64) over 2,000-8,000 slots (`benchmarks/gqa_decode_sdpa.py`, results in
    `benchmarks/results/gqa_decode_sdpa.md`). But the kernel gives each thread whole (row, head) items: the grouped
    call's B x H_kv items leave a thread idle when the threads do not divide them (SmolLM2's 3 KV heads on 2 threads:
    the grouped call took 1.18-1.35x `enable_gqa`'s over 1,060-8,000 slots, `gqa_decode_sdpa_2threads.md`), so on the
    CPU the grouped layout is taken only when they do (`balanced`)."""
    b, hq, q, d = query.shape
    hkv = key.shape[1]
    if (
        q == 1
        and hq != hkv
        and (mask is None or (isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[1] in (1, hkv)))
        and balanced(query.device, b * hkv)
    ):
        rows = query.reshape(b, hkv, hq // hkv, d)  # query head h reads KV head h // (H_q / H_kv)
        out = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
        return out.reshape(b, hq, 1, -1)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=None if isinstance(mask, str) or mask is None else expand_heads(mask, hq),
        dropout_p=dropout,
        is_causal=isinstance(mask, str),
        scale=scale,
        enable_gqa=hq != hkv,
    )


def _sdpa_forward(
    module: nn.Module,
    query: Tensor,  # (B, H_q, q, D)
    key: Tensor,  # (B, H_kv, T, D)
    value: Tensor,  # (B, H_kv, T, Dv)
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    if softcap is not None:  # sdpa cannot soft-cap logits; eager can
        out, _ = _eager_forward(module, query, key, value, attention_mask, scaling, dropout, softcap, **kwargs)
        return out, None
    mask, layer = _mask_for(query, key, attention_mask)
    query, scaling = _thin_queries(layer, query, scaling)
    shared = _shared_forward(layer, query, key, value, mask, scaling, None)
    if shared is not None:
        return shared, None
    summed = _received_forward(layer, query, key, value, mask, scaling, None)
    if summed is not None:
        return summed, None
    out = grouped_sdpa(query, key, value, mask, dropout if module.training else 0.0, scaling)
    if layer is not None:
        layer.finish_step()
    return out.transpose(1, 2).contiguous(), None


def _eager_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    mask, layer = _mask_for(query, key, attention_mask)
    query, scaling = _thin_queries(layer, query, scaling)
    shared = _shared_forward(layer, query, key, value, mask, scaling, softcap)
    if shared is not None:
        return shared, None  # no weights: they are never formed over the prefixes
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, k.transpose(2, 3)) * scale  # (B, H_q, q, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if isinstance(mask, str):
        q_len, k_len = logits.shape[-2:]
        mask = _fallback_mask(None, q_len, k_len, logits.device)
        if isinstance(mask, str):
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=logits.device).tril(k_len - q_len)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~expand_heads(mask, query.shape[1]), torch.finfo(logits.dtype).min)
        else:
            logits = logits + mask
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, v)
    if layer is not None:
        layer.finish_step()
    return out.transpose(1, 2).contiguous(), weights

"""Attention of rows that share prefixes (`storage/shared.py`): each prefix attended once for all the rows reading it.

A row's slots are its prefix's (shared with other rows, stored once) and its own (its question and answer). For the
rows reading one prefix, the logits against the prefix come from one matrix product: every row's queries (and every
query head of a KV head) stacked against the prefix's keys, so a document read by 16 rows is read from memory once
per layer and step, not 16 times. Each row's logits against its own slots come from its own small product. The two
are joined per row and go through one softmax, and the output is the prefix's values weighted by the first part plus
the row's own values weighted by the second: exactly softmax attention over all the row's slots, with no copy of the
prefix's keys or values (only logits, one float per query and slot, are joined).

A prefix is entirely visible to its rows' queries: every prefix slot precedes the row's own tokens, and sliding-window
layers are never shared; its empty slots (a view padded to its longest head) are masked. The own part follows the
step's mask (`attention.step_mask`). A ragged prefix is read head by head from its flat segments, never unpacked to a
rectangle. Logits and the softmax are float32 whatever the model's dtype (as SDPA keeps them), and a long batch of
questions is taken in chunks of queries whose logits stay under LOGITS_BUDGET elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsqueeze.storage.shared import PrefixRead

__all__ = ["LOGITS_BUDGET", "attend"]

LOGITS_BUDGET = 2**24  # float32 logits of one chunk of queries (64 MiB)


def _softmax_over_both(prefix_logits: Tensor, own_logits: Tensor, own_visible: Tensor | None,
                       prefix_visible: Tensor | None, softcap: float | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Softmax over the prefix's slots and the own ones together: (weights of the prefix's, weights of the own),
    float32; `*_visible` (broadcast to the logits) False where a query may not look."""
    logits = torch.cat([prefix_logits, own_logits], dim=-1)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if own_visible is not None or prefix_visible is not None:
        shape = (*logits.shape[:-1],)
        seen_prefix = (
            torch.ones(*shape, prefix_logits.shape[-1], dtype=torch.bool, device=logits.device)
            if prefix_visible is None
            else prefix_visible.expand(*shape, prefix_logits.shape[-1])
        )
        seen_own = (
            torch.ones(*shape, own_logits.shape[-1], dtype=torch.bool, device=logits.device)
            if own_visible is None
            else own_visible.expand(*shape, own_logits.shape[-1])
        )
        logits = logits.masked_fill(~torch.cat([seen_prefix, seen_own], dim=-1), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return weights[..., : prefix_logits.shape[-1]], weights[..., prefix_logits.shape[-1] :]


def _rows(grouped: Tensor, prefix: PrefixRead, keys: Tensor, values: Tensor, visible: Tensor | None, scale: float,
          softcap: float | None) -> Tensor:  # fmt: skip
    """Attention of grouped queries (n, H_kv, M, D) of the n rows reading `prefix` over its slots and their own (keys
    (n, H_kv, S, D), values (n, H_kv, S, Dv), visible (n, H_kv, M, S) or None): (n, H_kv, M, Dv) float32."""
    n, hkv, m, d = grouped.shape
    own_logits = torch.matmul(grouped.float(), keys.float().transpose(-1, -2)) * scale  # (n, H_kv, M, S)
    own_values = values.float()
    stacked = grouped.float().transpose(0, 1).reshape(hkv, n * m, d)  # every row's queries, per KV head

    def per_row(t: Tensor) -> Tensor:  # (H_kv, n M, X) -> (n, H_kv, M, X)
        return t.reshape(hkv, n, m, t.shape[-1]).transpose(0, 1)

    if prefix.heads is not None:  # a ragged prefix: each KV head's own segment, all of it filled
        return _ragged_rows(stacked, prefix.heads, own_logits, own_values, visible, scale, softcap)
    assert prefix.view is not None
    pk, pv, positions = prefix.view  # (1, H_kv, L, ...)
    prefix_logits = per_row(torch.matmul(stacked, pk[0].float().transpose(-1, -2)) * scale)  # (n, H_kv, M, L)
    prefix_visible = None if prefix.full else (positions[0] >= 0)[None, :, None, :]
    w_prefix, w_own = _softmax_over_both(prefix_logits, own_logits, visible, prefix_visible, softcap)
    from_prefix = per_row(torch.matmul(w_prefix.transpose(0, 1).reshape(hkv, n * m, -1), pv[0].float()))
    return from_prefix + torch.matmul(w_own, own_values)


def _ragged_rows(stacked: Tensor, heads: tuple[tuple[Tensor, Tensor], ...], own_logits: Tensor, own_values: Tensor,
                 visible: Tensor | None, scale: float, softcap: float | None) -> Tensor:  # fmt: skip
    """`_rows` over a ragged prefix: stacked queries (H_kv, n M, D), each head's segment (keys (L_h, D), values
    (L_h, Dv)), the own logits (n, H_kv, M, S) and values (n, H_kv, S, Dv) -> (n, H_kv, M, Dv) float32.

    The heads' logits are written into one buffer (H_kv, n M, max L_h + S), the slots past a head's length masked, so
    one softmax serves every head; only the two products per head run head by head."""
    hkv, nm, _ = stacked.shape
    n, _, m, s = own_logits.shape
    lengths = [k.shape[0] for k, _ in heads]
    width = max(lengths, default=0)
    logits = own_logits.new_empty(hkv, nm, width + s)
    for h, (pk, _) in enumerate(heads):
        torch.matmul(stacked[h], pk.float().T, out=logits[h, :, : lengths[h]])
    logits[:, :, :width] *= scale
    own = logits[:, :, width:]
    own.copy_(own_logits.transpose(0, 1).reshape(hkv, nm, s))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
        own = logits[:, :, width:]
    if visible is not None:
        own.masked_fill_(~visible.transpose(0, 1).reshape(hkv, nm, s), float("-inf"))
    for h, length in enumerate(lengths):  # a shorter head's slots past its segment: none
        logits[h, :, length:width] = float("-inf")
    weights = torch.softmax(logits, dim=-1)
    out = torch.matmul(weights[:, :, width:].reshape(hkv, n, m, s).transpose(0, 1), own_values)  # (n, H_kv, M, Dv)
    for h, (_, pv) in enumerate(heads):
        out[:, h] += (weights[h, :, : lengths[h]] @ pv.float()).reshape(n, m, -1)
    return out


def attend(
    query: Tensor,
    prefixes: list[PrefixRead],
    keys: Tensor,
    values: Tensor,
    visible: Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> Tensor:
    """Attention of query (B, H_q, q, D) over each row's prefix and its own slots; (B, H_q, q, Dv) in query's dtype.

    prefixes: each prefix's slots and the rows reading it (`SharedStorage.prefix_reads`); keys/values
    (B, H_kv, S, ...): the rows' own slots, new ones included; visible: bool broadcastable to (B, H_kv or 1, q, S),
    None when every query sees all of them."""
    b, hq, q, d = query.shape
    hkv, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    groups = hq // hkv
    grouped = query.reshape(b, hkv, groups * q, d)  # query head h reads KV head h // groups
    if visible is not None:
        visible = visible.expand(b, hkv, q, s)[:, :, None].expand(b, hkv, groups, q, s).reshape(b, hkv, groups * q, s)
    out = None if len(prefixes) == 1 and prefixes[0].rows is None else query.new_empty(b, hkv, groups * q, dv)
    for prefix in prefixes:
        rows = slice(None) if prefix.rows is None else prefix.rows
        mine = grouped[rows]
        width = max(_prefix_width(prefix) + s, 1)
        size = max(1, LOGITS_BUDGET // (mine.shape[0] * hkv * width))  # queries per chunk
        chunks = [
            _rows(mine[:, :, i : i + size], prefix, keys[rows], values[rows],
                  None if visible is None else visible[rows][:, :, i : i + size], scale, softcap)
            for i in range(0, groups * q, size)
        ]  # fmt: skip
        part = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
        if out is None:
            return part.reshape(b, hq, q, dv).to(query.dtype)
        out[rows] = part.to(out.dtype)
    assert out is not None
    return out.reshape(b, hq, q, dv)


def _prefix_width(prefix: PrefixRead) -> int:
    if prefix.heads is not None:
        return max((k.shape[0] for k, _ in prefix.heads), default=0)
    assert prefix.view is not None
    return prefix.view[2].shape[-1]

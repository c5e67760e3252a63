"""Attention of rows that share prefixes (`storage/shared.py`): each prefix attended once for all the rows reading it.

Softmax attention over a row's slots splits over any partition of them (cascade attention, as FlashInfer and
Hydragen call it): for each part compute, per query, the largest logit m, the sum s of exp(logit - m) and the
weighted values o = sum exp(logit - m) v; then

    out = (o_1 e^(m_1 - m) + o_2 e^(m_2 - m)) / (s_1 e^(m_1 - m) + s_2 e^(m_2 - m)),   m = max(m_1, m_2)

is exactly softmax attention over both parts. The prefix part stacks the queries of every row reading one prefix
(and every query head of a KV head) into one matrix product against that prefix's keys, so a document read by 16
rows is read from memory once per layer and step, not 16 times. A prefix is entirely visible to its rows' queries:
every prefix slot precedes the row's own tokens, and sliding-window layers are never shared. The suffix part is each
row's own tokens under the step's mask (`attention.step_mask`). Logits and the statistics are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsqueeze.storage import StepView

__all__ = ["Partial", "attend", "combine"]

Partial = tuple[Tensor, Tensor, Tensor]  # o (..., Dv) unnormalised, m (..., 1) largest logit, s (..., 1) sum


def _partial(queries: Tensor, keys: Tensor, values: Tensor, visible: Tensor | None, scale: float,
             softcap: float | None) -> Partial:  # fmt: skip
    """queries (N, H_kv, M, D) against keys (N, H_kv, T, D): the part's statistics, `visible` (broadcast to the
    logits (N, H_kv, M, T)) False where a query may not look; a query that sees nothing gets o = s = 0."""
    logits = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # nothing visible: exp(-inf - 0) = 0 everywhere
    p = torch.exp(logits - m)
    o = torch.matmul(p.to(values.dtype), values).float()
    return o, m, p.sum(dim=-1, keepdim=True)


def combine(a: Partial, b: Partial) -> Tensor:
    """Softmax attention over the union of two parts' slots (the module docstring's formula), float32."""
    m = torch.maximum(a[1], b[1])
    wa, wb = torch.exp(a[1] - m), torch.exp(b[1] - m)
    return (a[0] * wa + b[0] * wb) / (a[2] * wa + b[2] * wb).clamp_min(torch.finfo(torch.float32).tiny)


def attend(
    query: Tensor,
    prefixes: list[tuple[StepView, Tensor]],
    keys: Tensor,
    values: Tensor,
    visible: Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> Tensor:
    """Attention of query (B, H_q, q, D) over each row's prefix and its own slots; (B, H_q, q, Dv) in query's dtype.

    prefixes: (view (1, H_kv, L, ...) of a prefix, the rows (long) reading it), from `SharedStorage.prefix_rows`;
    keys/values (B, H_kv, S, ...): the rows' own slots, new ones included; visible: bool broadcastable to
    (B, H_kv or 1, q, S), None when every query sees all of them."""
    b, hq, q, d = query.shape
    hkv, dv = keys.shape[1], values.shape[-1]
    groups = hq // hkv
    grouped = query.reshape(b, hkv, groups * q, d)  # query head h reads KV head h // groups
    if visible is not None:
        visible = visible.expand(b, hkv, q, keys.shape[2])[:, :, None].expand(b, hkv, groups, q, keys.shape[2])
        visible = visible.reshape(b, hkv, groups * q, keys.shape[2])
    own = _partial(grouped, keys, values, visible, scale, softcap)
    o = torch.zeros(b, hkv, groups * q, dv, dtype=torch.float32, device=query.device)
    m = torch.zeros(b, hkv, groups * q, 1, device=query.device)
    s = torch.zeros_like(m)
    for (pk, pv, ppos), rows in prefixes:
        n = rows.numel()
        stacked = grouped[rows].transpose(0, 1).reshape(1, hkv, n * groups * q, d)  # every row's queries at once
        filled = ppos >= 0  # (1, H_kv, L)
        seen = None if bool(filled.all()) else filled[:, :, None, :]
        po, pm, ps = _partial(stacked, pk, pv, seen, scale, softcap)
        o[rows] = po.reshape(hkv, n, groups * q, dv).transpose(0, 1)
        m[rows] = pm.reshape(hkv, n, groups * q, 1).transpose(0, 1)
        s[rows] = ps.reshape(hkv, n, groups * q, 1).transpose(0, 1)
    out = combine((o, m, s), own)
    return out.reshape(b, hq, q, dv).to(query.dtype)

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
questions is taken in chunks of queries whose logits (with the fused kernel below: whose own slots' mask) stay under
LOGITS_BUDGET elements.

Rows over a full rectangular prefix on the CPU (no soft-cap) are attended by PyTorch's fused kernel instead
(`FLASH_WITH_LSE`, the one SDPA runs there), which reads keys and values tile by tile, makes no logits matrix, and
also returns each query's log-sum-exp: one call over the prefix, one over the rows' own slots (with their mask), and
the two outputs joined by their log-sum-exps. With lse_p and lse_o the two parts' log-sum-exps, the prefix holds
sigmoid(lse_p - lse_o) of the softmax's mass, so the output is lerp(out_o, out_p, sigmoid(lse_p - lse_o)): the same
attention (in bfloat16 each part's output is rounded to it before the float32 join, one rounding more than the
products). A query that sees none of its own slots (never one from `attention.step_mask`, where a pad query sees
itself) gets the prefix's output alone, as from the products. Decoding from a fork of the embedded model's
uncompressed context, the kernel over the prefix alone (before the own slots joined it) ran 1.05x / 1.07x the
separate products and softmax at 4k / 7k tokens (medians of 5 pairs, `docs/studies/generation-speed.md`).

A ragged prefix whose every head holds two slots or more goes through the kernel too, one call per KV head. The call
reads the head's segment as a batch of its two halves (views, `storage.shared.Halves`), because the kernel shares out
whole (batch, head) items among the CPU's threads: a one-item call leaves the second thread idle, and then ran at
0.98x the products on the embedded model. The halves and the own slots are joined by one softmax over their three
log-sum-exps. One decode step of a ragged fork against the products before (`benchmarks/ragged_decode_step.py`, at
SmolLM2's heads and at Llama-3.1-8B's, `docs/studies/generation-speed.md`): on two threads 0.488 -> 0.370 ms and
2.113 -> 0.972 ms (a rectangular fork holding the same bytes: 0.276 and 0.729 ms), on one thread 0.472 -> 0.456 ms and
1.716 -> 1.532 ms. A call has two items, so a CPU with more threads leaves the others idle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvsqueeze.storage.shared import Halves, PrefixRead

__all__ = ["FLASH_WITH_LSE", "LOGITS_BUDGET", "attend", "fused_ok"]

LOGITS_BUDGET = 2**24  # float32 logits of one chunk of queries (64 MiB)
# PyTorch's fused CPU attention kernel (the one SDPA runs on the CPU), which also returns each query's log-sum-exp
FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _rows(grouped: Tensor, prefix: PrefixRead, keys: Tensor, values: Tensor, visible: Tensor | None, scale: float,
          softcap: float | None) -> Tensor:  # fmt: skip
    """Attention of grouped queries (n, H_kv, M, D) of the n rows reading `prefix` over its slots and their own (keys
    (n, H_kv, S, D), values (n, H_kv, S, Dv), visible (n, H_kv, M, S) or None): (H_kv, n M, Dv) float32.

    The logits go into one buffer (H_kv, n M, S + L): each row's own slots first, then the prefix's L slots (a ragged
    prefix: head h's L_h, the slots past them never written nor read). The queries are scaled once, before the
    products, so no logit is scaled again."""
    n, hkv, m, d = grouped.shape
    s = keys.shape[2]
    queries = grouped.float() * scale
    logits = queries.new_empty(hkv, n * m, s + _prefix_width(prefix))
    own = logits[:, :, :s]
    own_keys = keys.float().reshape(n * hkv, s, d).transpose(1, 2)
    if n == 1:  # one row: its (H_kv, M, S) logits are the buffer's layout, written in place
        torch.bmm(queries.view(hkv, m, d), own_keys, out=own)
        if softcap is not None:
            own.copy_(_capped(own, softcap))
        if visible is not None:
            own.masked_fill_(~visible[0], float("-inf"))
    else:
        logits_n = _capped(torch.bmm(queries.view(n * hkv, m, d), own_keys).view(n, hkv, m, s), softcap)
        if visible is not None:
            logits_n = logits_n.masked_fill(~visible, float("-inf"))
        own.copy_(logits_n.transpose(0, 1).reshape(hkv, n * m, s))
    own_values = values.float().transpose(0, 1)  # (H_kv, n, S, Dv)
    stacked = queries.transpose(0, 1).reshape(hkv, n * m, d)  # every row's queries, per KV head
    if prefix.heads is None:
        assert prefix.view is not None
        pk, pv, positions = prefix.view  # (1, H_kv, L, ...)
        seen = logits[:, :, s:]
        torch.bmm(stacked, pk[0].float().transpose(1, 2), out=seen)
        if softcap is not None:
            seen.copy_(_capped(seen, softcap))
        if not prefix.full:
            seen.masked_fill_((positions[0] < 0)[:, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        return _own_output(weights[:, :, :s], own_values).baddbmm_(weights[:, :, s:], pv[0].float())
    for q_h, logits_h, (pk, _) in zip(stacked, logits, prefix.heads, strict=True):
        used = logits_h[:, : s + pk.shape[0]]  # the head's own slots, then its L_h
        torch.mm(q_h, pk.float().T, out=used[:, s:])
        if softcap is not None:
            used[:, s:] = _capped(used[:, s:], softcap)
        torch.softmax(used, dim=-1, out=used)  # weights over the logits, in place
    out = _own_output(logits[:, :, :s], own_values)  # every head's own slots' share at once
    for out_h, logits_h, (pk, pv) in zip(out, logits, prefix.heads, strict=True):
        out_h.addmm_(logits_h[:, s : s + pk.shape[0]], pv.float())
    return out


def _fusable(grouped: Tensor, prefix: PrefixRead, keys: Tensor, values: Tensor, softcap: float | None) -> bool:
    """Whether the fused kernel attends these rows (`_fused_rows`): no soft-cap (the kernel cannot apply it), at least
    one own slot, and a prefix it can read: a rectangular one with no empty slot and at least one slot, or a ragged
    one taken in halves (every head holding two slots or more, `PrefixRead.halves`); the prefix's and the rows' own
    tensors all ones `fused_ok` accepts."""
    if softcap is not None or keys.shape[2] == 0 or not fused_ok(grouped, keys, values):
        return False
    if prefix.halves is not None:
        return fused_ok(grouped, prefix.halves[0].keys, prefix.halves[0].values)
    if prefix.view is None or not prefix.full or prefix.view[2].shape[-1] == 0:
        return False
    return fused_ok(grouped, *prefix.view[:2])


def _fused_rows(grouped: Tensor, prefix: PrefixRead, keys: Tensor, values: Tensor, visible: Tensor | None,
                scale: float) -> Tensor:  # fmt: skip
    """Attention of `_rows`' rows over a prefix the fused kernel reads (`_fusable`): the prefix and the rows' own slots
    each attended by the kernel, then joined by their log-sum-exps (see the module docstring): (n, H_kv, M, Dv)
    float32."""
    assert FLASH_WITH_LSE is not None
    n, hkv, m, d = grouped.shape
    mask = None if visible is None else grouped.new_zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    own, own_lse = FLASH_WITH_LSE(grouped, keys, values, 0.0, False, attn_mask=mask, scale=scale)
    if visible is not None:  # the kernel gives a query that sees no own slot a log-sum-exp of 0, not -inf
        own_lse.masked_fill_(~visible.any(dim=-1), float("-inf"))
    if prefix.halves is not None:
        return _halves_joined(grouped, prefix.halves, own, own_lse, scale)
    assert prefix.view is not None
    pk, pv, _ = prefix.view
    if n == 1:  # one row (decoding an answer): its queries are already the kernel's batch of one
        seen, seen_lse = FLASH_WITH_LSE(grouped, pk, pv, 0.0, False, scale=scale)
    else:  # every row's queries against the one prefix
        stacked = grouped.transpose(0, 1).reshape(1, hkv, n * m, d)
        seen, seen_lse = FLASH_WITH_LSE(stacked, pk, pv, 0.0, False, scale=scale)
        seen, seen_lse = seen[0].unflatten(1, (n, m)).transpose(0, 1), seen_lse[0].unflatten(1, (n, m)).transpose(0, 1)
    share = torch.sub(seen_lse, own_lse, out=own_lse).sigmoid_()[..., None]  # the prefix's part of the softmax's mass
    if own.dtype == torch.float32:
        return own.lerp_(seen, share)  # in place: both are the kernel's fresh outputs
    return torch.lerp(own.float(), seen.float(), share)


def _halves_joined(grouped: Tensor, halves: tuple[Halves, ...], own: Tensor, own_lse: Tensor, scale: float) -> Tensor:
    """`_fused_rows` over a ragged prefix: each head's two halves in one kernel call (two items, so two threads share
    it), every row's queries of the head against both, then the two halves and the own slots joined by one softmax
    over their three log-sum-exps: (n, H_kv, M, Dv) float32."""
    assert FLASH_WITH_LSE is not None
    n, hkv, m, d = grouped.shape
    stacked = grouped.transpose(0, 1).reshape(hkv, 1, 1, n * m, d)  # per KV head, every row's queries
    parts, lses = [], []
    for queries, half in zip(stacked, halves, strict=True):
        out, lse = FLASH_WITH_LSE(queries.expand(1, 2, n * m, d), half.keys, half.values, 0.0, False,
                                  attn_mask=half.middle, scale=scale)  # fmt: skip
        parts.append(out)
        lses.append(lse)
    seen = torch.cat(parts, dim=1).view(hkv, 2, n, m, -1).permute(2, 0, 1, 3, 4)  # (n, H_kv, 2, M, Dv)
    seen_lse = torch.cat(lses, dim=1).view(hkv, 2, n, m).permute(2, 0, 1, 3)  # (n, H_kv, 2, M)
    weights = torch.softmax(torch.cat([seen_lse, own_lse[:, :, None]], dim=2), dim=2)[..., None]  # each part's share
    out = (seen.float() * weights[:, :, :2]).sum(dim=2)
    return out.addcmul_(own.float(), weights[:, :, 2])


def fused_ok(queries: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether FLASH_WITH_LSE can attend these queries over these keys and values: it exists, they are on the CPU, of
    one dtype and one head size (thin keys are narrower than the values), each with its channels next to each other in
    memory (the kernel reads a row as if they were; called directly, it skips the check SDPA makes before it)."""
    return (
        FLASH_WITH_LSE is not None
        and queries.device.type == "cpu"
        and queries.dtype == keys.dtype == values.dtype
        and queries.dtype in (torch.float32, torch.bfloat16)
        and queries.shape[-1] == keys.shape[-1] == values.shape[-1]
        and queries.stride(-1) == keys.stride(-1) == values.stride(-1) == 1
    )


def _own_output(weights: Tensor, values: Tensor) -> Tensor:
    """Each row's own slots' share of the output: weights (H_kv, n M, S) over values (H_kv, n, S, Dv) -> (H_kv, n M,
    Dv); one row (decoding an answer) by a 3-D product, quicker to dispatch than the 4-D one."""
    hkv, rows, s = weights.shape
    n = values.shape[1]
    if n == 1:
        return torch.bmm(weights, values[:, 0])
    return torch.matmul(weights.view(hkv, n, rows // n, s), values).view(hkv, rows, -1)


def _capped(logits: Tensor, softcap: float | None) -> Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


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
    None when every query sees all of them (a query that sees none of them attends to its prefix alone)."""
    b, hq, q, d = query.shape
    hkv, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    groups = hq // hkv
    grouped = query.reshape(b, hkv, groups * q, d)  # query head h reads KV head h // groups
    if visible is not None:
        visible = visible.expand(b, hkv, q, s)[:, :, None].expand(b, hkv, groups, q, s).reshape(b, hkv, groups * q, s)
    out = None if len(prefixes) == 1 and prefixes[0].rows is None else query.new_empty(b, hkv, groups * q, dv)
    for prefix in prefixes:
        mine, own_keys, own_values, own_visible = grouped, keys, values, visible
        if prefix.rows is not None:
            mine, own_keys, own_values = grouped[prefix.rows], keys[prefix.rows], values[prefix.rows]
            own_visible = None if visible is None else visible[prefix.rows]
        n = mine.shape[0]
        fused = _fusable(mine, prefix, own_keys, own_values, softcap)
        width = 0 if fused else _prefix_width(prefix)  # logit columns beside the own slots' (the kernel: their mask)
        size = max(1, LOGITS_BUDGET // (n * hkv * max(width + s, 1)))  # queries per chunk
        if size >= groups * q or (fused and own_visible is None):  # one chunk: no slicing
            part = _part(mine, prefix, own_keys, own_values, own_visible, scale, softcap, fused)
        else:
            chunks = []
            for i in range(0, groups * q, size):
                rows, seen = mine[:, :, i : i + size], None if own_visible is None else own_visible[:, :, i : i + size]
                chunks.append(_part(rows, prefix, own_keys, own_values, seen, scale, softcap, fused))
            part = torch.cat(chunks, dim=2)
        if out is None:
            return part.reshape(b, hq, q, dv).to(query.dtype)
        out[prefix.rows] = part.to(out.dtype)
    assert out is not None
    return out.reshape(b, hq, q, dv)


def _part(grouped: Tensor, prefix: PrefixRead, keys: Tensor, values: Tensor, visible: Tensor | None, scale: float,
          softcap: float | None, fused: bool) -> Tensor:  # fmt: skip
    """Attention of one chunk of the rows' queries by the fused kernel or by the products: (n, H_kv, M, Dv) float32."""
    if fused:
        return _fused_rows(grouped, prefix, keys, values, visible, scale)
    n = grouped.shape[0]
    return _rows(grouped, prefix, keys, values, visible, scale, softcap).unflatten(1, (n, -1)).transpose(0, 1)


def _prefix_width(prefix: PrefixRead) -> int:
    if prefix.heads is not None:
        return max((k.shape[0] for k, _ in prefix.heads), default=0)
    assert prefix.view is not None
    return prefix.view[2].shape[-1]

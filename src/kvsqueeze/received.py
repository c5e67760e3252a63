"""Attention that also returns what each slot received: for methods that score slots by the attention the context's
own queries gave them (observed attention, H2O), computed once, in the forward, instead of twice.

Such a method needs every new query's softmax weights over the layer's slots. Recomputing them after the forward
repeats the attention's largest product (queries x keys) and its exponentials: at 4k tokens that doubled the attention
time of a prefill. Inside `compress` with a method that uses ("received_attention",), `attention.py` runs `attend` on
rectangular layers instead of SDPA: the queries go in blocks; each block's logits go through one softmax, and its
weights give both the output (their product with the values) and the block's share of every slot's received attention
(the real queries' weights summed, over the query heads of each KV head too). The hook then hands the sums to the
method (`ScoreContext.received`).

Logits, weights and sums are float32 whatever the model's dtype (as SDPA's CPU kernels keep them); the output is cast
back. One buffer holds a block's logits, softmaxed in place into its weights (a fresh multi-MiB allocation per block
costs page faults on CPU; a second buffer for the weights doubled what each block passes through the caches). Each
product covers all the block's KV heads in one batched call, whose batch PyTorch spreads over the CPU threads itself: a
plain product per head leaves the threading to the BLAS library, which on the 2-CPU benchmark machine ran the products
of some processes on one thread. Pad queries attend as the mask lets them (to themselves) and add nothing to the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOGITS_BUDGET", "attend"]

LOGITS_BUDGET = 2**21  # float32 logits of one block of queries (8 MiB), softmaxed in place


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | str | None,
    scale: float,
    real: Tensor,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of query (B, H_q, q, D) over key (B, H_kv, T, D) / value (B, H_kv, T, Dv), query head h
    reading KV head h // (H_q / H_kv); mask: "causal" (q == T), None (every slot) or bool broadcastable to
    (B, H_kv, q, T), True = may attend; real: (B, q) bool, the queries whose weights are summed.

    Returns the output (B, H_q, q, Dv) in query's dtype and the received attention (B, H_kv, T) float32: each slot's
    weights summed over the real queries and the query heads of its KV head."""
    b, hq, q, d = query.shape
    hkv, t, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    causal = isinstance(mask, str)
    if causal and q != t:
        raise ValueError(f"a 'causal' mask needs as many queries as slots, got {q} and {t}")
    keys_t, values = key.float().transpose(-1, -2), value.float()
    grouped = (query.float() * scale).view(b, hkv, g, q, d)
    out = query.new_empty(b, hkv, g, q, dv, dtype=torch.float32)
    received = torch.zeros(b, hkv, t, device=query.device, dtype=torch.float32)
    weight = real.to(device=query.device, dtype=torch.float32)
    block = max(1, min(q, LOGITS_BUDGET // max(1, b * hq * t)))
    buffer = torch.empty(b * hkv * g * block * t, device=query.device, dtype=torch.float32)  # logits, then weights
    for lo in range(0, q, block):
        hi = min(q, lo + block)
        n = hi - lo
        end = hi if causal else t  # causal: no query of the block sees a later slot
        logits = buffer[: b * hkv * g * n * end].view(b, hkv, g * n, end)
        torch.matmul(grouped[:, :, :, lo:hi].reshape(b, hkv, g * n, d), keys_t[..., :end], out=logits)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        per_query = logits.view(b, hkv, g, n, end)
        if causal:  # only the block's own columns can lie ahead of one of its queries
            ahead = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
            per_query[..., lo:end].masked_fill_(ahead, float("-inf"))
        elif isinstance(mask, Tensor):
            visible = mask[..., lo:hi, :end].expand(b, hkv, n, end)
            per_query.masked_fill_(~visible[:, :, None], float("-inf"))
        # in place (one pass per row, where max, exp and sum took four)
        weights = torch.softmax(logits, dim=-1, out=logits)
        out[:, :, :, lo:hi] = torch.matmul(weights, values[:, :, :end]).view(b, hkv, g, n, dv)
        counted = weight[:, None, None, lo:hi].expand(b, hkv, g, n).reshape(b, hkv, 1, g * n)
        received[:, :, :end] += torch.matmul(counted, weights)[:, :, 0]
    return out.view(b, hq, q, dv).to(query.dtype), received

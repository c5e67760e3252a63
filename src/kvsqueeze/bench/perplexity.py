"""Perplexity under decoding-time compression: a text scored token by token, as a long generation would see it.

The first `prefix` tokens go in one forward; every later token is fed alone (teacher forcing, one token per step),
so a method applied after every forward (e.g. `DecodingCompression`) evicts exactly as it would while generating,
and each token's probability is computed from the cache that is left. Without a method this equals scoring the
whole text in one forward (up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.cache import KVCache
from kvsqueeze.memory import cache_stats
from kvsqueeze.methods.base import Method
from kvsqueeze.press import compress


@dataclass
class TextScore:
    nll: Tensor  # (n - prefix,) negative log-likelihood of each scored token, in nats
    peak_kv_bytes: int  # the most keys+values bytes the cache held while scoring
    kv_bytes: int  # held at the end

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))


@torch.no_grad()
def score_tokens(model: Any, ids: Tensor, method: Method | None = None, prefix: int = 1) -> TextScore:
    """Score ids (1, n) token by token after a `prefix`-token prefill, compressing with `method` after each forward."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one row of token ids (1, n), got shape {tuple(ids.shape)}")
    n = ids.shape[1]
    if not 1 <= prefix < n:
        raise ValueError(f"prefix must be in [1, {n - 1}] for {n} tokens, got {prefix}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    cache = KVCache(model.config)
    nll = torch.empty(n - prefix, dtype=torch.float64)
    with compress(model, method):
        logits = model(input_ids=ids[:, :prefix], past_key_values=cache, logits_to_keep=1).logits[0, -1]
        for i in range(prefix, n):
            nll[i - prefix] = -torch.log_softmax(logits.double(), dim=-1)[ids[0, i]]
            if i + 1 < n:
                logits = model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits[0, -1]
    stats = cache_stats(cache)
    return TextScore(nll=nll, peak_kv_bytes=stats.peak_kv_bytes, kv_bytes=stats.kv_bytes)

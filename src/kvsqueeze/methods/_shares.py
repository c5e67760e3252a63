"""Whole-token layer budgets from real-valued shares: the allocation step shared by the layer-budget methods (CAKE,
SqueezeAttention) that fix the model's total and let the layers differ."""

from __future__ import annotations

import math


def capped_shares(total: float, weights: list[float], caps: list[int]) -> list[float]:
    """`total` split in proportion to `weights`, no share above its cap: what a capped layer cannot take goes to the
    others in proportion to their weights (a zero total weight splits evenly)."""
    out = [0.0] * len(weights)
    free = [i for i, c in enumerate(caps) if c > 0]
    left = total
    while free and left > 0:
        mass = sum(weights[i] for i in free)
        share = {i: left * weights[i] / mass if mass > 0 else left / len(free) for i in free}
        over = [i for i in free if share[i] >= caps[i]]
        if not over:
            for i in free:
                out[i] = share[i]
            break
        for i in over:
            out[i] = float(caps[i])
            left -= caps[i]
            free.remove(i)
    return out


def integer_shares(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Whole tokens per layer summing to `total` (when the caps allow): floors, then one more token to the layers with
    the largest remainders (ties: the earlier layer), never above a layer's cap."""
    out = [min(math.floor(s + 1e-6), c) for s, c in zip(shares, caps, strict=True)]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - out[i]), i))
    left = total - sum(out)
    while left > 0 and any(out[i] < caps[i] for i in order):
        for i in order:
            if left > 0 and out[i] < caps[i]:
                out[i] += 1
                left -= 1
    return out

"""CaM: cache merging during decoding (Zhang, Du, Luo, Zhong, Zhang, Liu, Ji, "CaM: Cache Merging for
Memory-efficient LLMs Inference", ICML 2024, PMLR 235:58840-58850).

Eviction perturbs the attention output however well the evicted token is chosen; CaM folds the value of a token
about to be evicted into the values of the tokens that stay, with a probability set by how much attention the
evicted token still gets. Here, on top of `DecodingCompression` (a budget kept while decoding: `target_tokens`, or
floor(seen (1 - ratio)); one token evicted per step by default, `every = 1`, as in the paper), per (row, KV head):

* the scorer (KNorm by default) picks the kept slots, exactly as `DecodingCompression` alone would;
* each evicted token j is merged into its merge set: the `merge_budget` (m) kept tokens that follow it in position
  order (fewer when fewer follow; none: it is dropped);
* merge probability p_j = min(1, A_j / mean_{k in set} A_k), A = the attention the newest token of this forward pays
  to each slot (the model's softmax(q k scaling), soft-capped where the model is), averaged over the query heads of
  the KV head;
* with `sample=True` (the paper's rule) the merge happens when u_j < p_j, u_j a uniform draw; each member k of the set
  then gets v_k += v_j / m' (m' = size of the set; the key of j is dropped); `sample=False` adds p_j v_j / m' instead
  (the expectation, deterministic).
All evicted tokens of one compression merge at once into the values as cached (no cascade within a step; across
steps a merged token can itself be merged later). The draws u are a hash of (seed, layer, head, position), so a token
gets the same draw in any batch, row copy or rerun. The paper's Algorithm 1 accumulates attention over the decoding
steps (H2O-style); A here is the newest query's attention only, which is what this step can see without state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvsqueeze.methods.base import ScoreContext
from kvsqueeze.methods.decoding import DecodingCompression
from kvsqueeze.methods.merge import kept_mask
from kvsqueeze.methods.registry import get_method, register_method
from kvsqueeze.methods.snapkv import window_attention
from kvsqueeze.validation import check_bool, check_int

_MODULUS = 2_147_483_647  # 2^31 - 1: products below stay far inside int64


def position_draws(seed: int, layer_idx: int, positions: Tensor) -> Tensor:
    """(B, H, T) numbers in (0, 1) from (seed, layer, head, position): a token's draw never depends on the batch."""
    heads = torch.arange(positions.shape[1], device=positions.device)[None, :, None]
    base = ((seed % _MODULUS) * 1_000_003 + layer_idx * 7_919) % _MODULUS
    x = ((base * 31 + heads) * 65_537 + positions.long().clamp(min=0)) % _MODULUS + 1
    for _ in range(4):  # a few rounds of the Park-Miller generator
        x = (x * 48_271) % _MODULUS
    return x.double().div(_MODULUS).float()


def newest_attention(ctx: ScoreContext) -> Tensor:
    """(B, H, T) attention of each row's last token of this forward over the slots, mean over the GQA group."""
    attn = window_attention(ctx, 1)  # (B, H_q, T), with the model's scaling and soft-capping
    b, h, t, _ = ctx.keys.shape
    return attn.view(b, h, -1, t).mean(dim=2)


def cam_merge(
    values: Tensor, valid: Tensor, indices: Tensor, counts: Tensor, attn: Tensor, m: int, draws: Tensor | None
) -> Tensor:
    """(B, H, K, Dv) the kept slots' values after CaM's merge (module docstring). values (B, H, T, Dv); valid, attn
    (B, H, T); indices (B, H, K), counts (B, H) as a plan returns them; draws (B, H, T) uniform, or None for p."""
    b, h, t, dv = values.shape
    k = indices.shape[-1]
    kept = kept_mask(indices, counts, t)
    first = kept.long().cumsum(dim=-1)  # (B, H, T) rank of the first kept slot after each evicted slot
    target = first[..., None] + torch.arange(m, device=values.device)  # (B, H, T, m) ranks of the merge set
    member = target < counts[..., None, None]
    size = member.sum(dim=-1)  # (B, H, T) m'
    target = target.clamp(max=max(k - 1, 0))
    set_attn = attn.gather(-1, indices).gather(-1, target.flatten(2)).view(b, h, t, m)
    mean = (set_attn * member).sum(dim=-1) / size.clamp(min=1)
    p = torch.where(mean > 0, attn / mean.clamp(min=torch.finfo(torch.float32).tiny), 1.0).clamp(0.0, 1.0)
    weight = (draws < p).float() if draws is not None else p
    share = weight * (valid & ~kept & (size > 0)) / size.clamp(min=1)  # (B, H, T) what each member gets of v_j
    added = values.float()[..., None, :] * (share[..., None] * member)[..., None]  # (B, H, T, m, Dv)
    out = values.float().gather(2, indices[..., None].expand(b, h, k, dv))
    return out.scatter_add(2, target.flatten(2)[..., None].expand(b, h, t * m, dv), added.flatten(2, 3))


@register_method("cam")
@dataclass
class CaM(DecodingCompression):
    """Decoding-time eviction (KNorm) that first merges evicted values into the next kept ones, with a probability
    from their attention (CaM)."""

    every: int = 1  # the paper evicts (and merges) one token per step
    merge_budget: int = 4  # m: kept tokens after an evicted one that share its value
    sample: bool = True  # Bernoulli merge (the paper); False: add the expected share p v / m
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.scorer, str):  # a registered name (`--option cam.scorer=snapkv`)
            self.scorer = get_method(self.scorer)  # type: ignore[assignment]
        super().__post_init__()
        check_int("merge_budget", self.merge_budget, 1)
        check_bool("sample", self.sample)
        check_int("seed", self.seed, 0)

    def merge_values(self, ctx: ScoreContext, indices: Tensor, counts: Tensor) -> Tensor:
        attn = newest_attention(ctx)
        draws = position_draws(self.seed, ctx.layer_idx, ctx.positions) if self.sample else None
        return cam_merge(ctx.values, ctx.valid, indices, counts, attn, self.merge_budget, draws)

"""Expected Attention: score each cached pair by the attention future queries are expected to pay it, in closed form
(Devoto, Jeblick, Jegou 2025, arXiv 2510.00636).

Future queries are modelled as Gaussian: mean and covariance of the context's own pre-RoPE queries (first `n_sink`
positions left out), rotated by RoPE averaged over the next `n_future` absolute positions. For q ~ N(mu, Sigma) and
logit scale s (1/sqrt(d)), E[exp(s q.k)] = exp(s k.mu + s^2 k^T Sigma k / 2); its softmax over the non-sink keys,
averaged over the GQA group and rescaled by the value norm, (a + eps) * ||v|| (or ||W_O v||), is the score.
s is the layer's own logit scale (Gemma's query_pre_attn_scalar included); Gemma2's logit soft-capping is not
modelled (the closed form is for exp(s q.k)).

The query statistics come from `query_stats`, a (count, mean, centred second moment) triple that `QueryStats.merge`
combines exactly (Chan et al.'s parallel update), so a chunked prefill can accumulate them across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvsqueeze.methods.base import Need, ScoreContext, ScorerMethod, sinks_and_recent
from kvsqueeze.methods.registry import register_method
from kvsqueeze.models import apply_rope
from kvsqueeze.validation import check_bool, check_float, check_int


@dataclass
class QueryStats:
    """Per-row, per-query-head statistics of a set of queries; `merge` adds two disjoint sets exactly."""

    count: Tensor  # (B,) number of queries
    mean: Tensor  # (B, H_q, D)
    m2: Tensor  # (B, H_q, D, D) sum over queries of (q - mean)(q - mean)^T

    def merge(self, other: QueryStats) -> QueryStats:
        n = self.count + other.count
        w = (other.count / n.clamp(min=1))[:, None, None]  # (B, 1, 1)
        delta = other.mean - self.mean  # (B, H_q, D)
        cross = (self.count * w[:, 0, 0])[:, None, None, None] * delta[..., :, None] * delta[..., None, :]
        return QueryStats(n, self.mean + w * delta, self.m2 + other.m2 + cross)

    def covariance(self) -> Tensor:
        """(B, H_q, D, D) maximum-likelihood covariance (divided by the count)."""
        return self.m2 / self.count.clamp(min=1)[:, None, None, None]


def query_stats(queries: Tensor, weight: Tensor) -> QueryStats:
    """Statistics of the queries (B, H_q, q, D) where `weight` (B, q) is 1 (0 leaves a query out), in fp32."""
    q, w_all = queries.float(), weight.float()
    count = w_all.sum(dim=1)  # (B,)
    start = _common_start(weight)
    w: Tensor | None = w_all
    if start is not None:  # the counted queries are one suffix shared by every row (no padding): slice, no mask
        q, w = q[:, :, start:], None
    mean = (q.sum(dim=2) if w is None else torch.einsum("bhqd,bq->bhd", q, w)) / count.clamp(min=1)[:, None, None]
    centred = q - mean[:, :, None, :]  # (B, H_q, q, D)
    if w is not None:
        centred.mul_(w[:, None, :, None])  # left-out queries zeroed
    return QueryStats(count, mean, centred.transpose(-1, -2) @ centred)


def _common_start(weight: Tensor) -> int | None:
    """s when every row of the 0/1 `weight` (B, q) is 0 before s and 1 from s on, else None."""
    counted = weight.bool()
    start = int(counted.shape[1] - counted.sum(dim=1).min()) if counted.numel() else 0
    ok = bool(counted[:, start:].all()) and not bool(counted[:, :start].any())
    return start if ok else None


def averaged_rope(ctx: ScoreContext, n_future: int) -> tuple[Tensor, Tensor]:
    """cos, sin (B, 1, R) averaged over the absolute positions seen .. seen + n_future - 1 of each row."""
    positions = ctx.seen.to(ctx.keys.device)[:, None] + torch.arange(n_future, device=ctx.keys.device)  # (B, F)
    cos, sin = ctx.adapter.rope_at(ctx.layer_idx, positions, ctx.keys.float())  # (B, F, R)
    return cos.float().mean(dim=1, keepdim=True), sin.float().mean(dim=1, keepdim=True)


def expected_logits(keys: Tensor, mean: Tensor, cov: Tensor | None, scale: float) -> Tensor:
    """log E[exp(scale q.k)] for q ~ N(mean, cov): (B, H_q, T) from keys (B, H, T, D), mean (B, H_q, D), cov
    (B, H_q, D, D) or None (mean only)."""
    b, h, t, d = keys.shape
    k = keys.float()
    g = mean.shape[1] // h
    z = k @ (scale * mean).view(b, h, g, d).transpose(-1, -2)  # (B, H, T, G): matmuls, no (T, D) broadcast product
    if cov is not None:  # k^T Sigma_g k for the G query heads of each KV head: one matmul against [Sigma_1 .. Sigma_G]
        kc = k @ cov.view(b, h, g, d, d).permute(0, 1, 3, 2, 4).reshape(b, h, d, g * d)  # (B, H, T, G*D)
        quad = kc.view(b, h, t, g, d).mul_(k[:, :, :, None, :]).sum(dim=-1)  # (B, H, T, G)
        z = z.add_(quad, alpha=0.5 * scale**2)
    return z.transpose(-1, -2).reshape(b, h * g, t)


@register_method("expected_attention")
@dataclass
class ExpectedAttention(ScorerMethod):
    """Keep the pairs future queries are expected to attend to most (Gaussian queries, averaged RoPE), value-norm
    rescaled; the first n_sink tokens are kept."""

    needs: ClassVar[tuple[Need, ...]] = ("queries",)

    n_future: int = 512  # future positions RoPE is averaged over
    n_sink: int = 4  # first positions always kept and left out of the query statistics
    use_covariance: bool = True  # False: mean query only (the k^T Sigma k term dropped)
    use_vnorm: bool = True  # rescale by the value norm: (a + eps) * ||v||
    use_output_projection: bool = False  # with use_vnorm: ||W_O v|| (each query head's slice of o_proj) for ||v||
    eps: float = 1e-2  # added to the expected attention before rescaling (1e-2 helped on RULER, per the authors)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_future", self.n_future, 1)
        check_int("n_sink", self.n_sink, 0)
        check_float("eps", self.eps, 0.0, finite=True)
        for flag in ("use_covariance", "use_vnorm", "use_output_projection"):
            check_bool(flag, getattr(self, flag))
        if self.use_output_projection and not self.use_vnorm:
            raise ValueError("use_output_projection=True rescales by ||W_O v||: it needs use_vnorm=True")

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        stats = self.stats(ctx)
        cos, sin = averaged_rope(ctx, self.n_future)
        mean = apply_rope(stats.mean[:, :, None], cos, sin)[:, :, 0]  # R mu: (B, H_q, D)
        cov = None
        if self.use_covariance:  # R Sigma R^T; apply_rope(X) = X R^T on the last dimension
            cov = apply_rope(apply_rope(stats.covariance(), cos, sin).transpose(-1, -2), cos, sin)
        z = expected_logits(ctx.keys, mean, cov, ctx.scaling)  # (B, H_q, T)
        b, hq, t = z.shape
        h = ctx.keys.shape[1]
        sinks = sinks_and_recent(ctx, self.n_sink, 0).repeat_interleave(hq // h, dim=1)  # (B, H_q, T)
        counted = ctx.valid.repeat_interleave(hq // h, dim=1) & ~sinks
        attn = torch.softmax(z.masked_fill_(~counted, float("-inf")), dim=-1).nan_to_num_(0.0).add_(self.eps)
        if self.use_vnorm:
            attn = attn.mul_(self.value_norms(ctx))
        return attn.view(b, h, hq // h, t).mean(dim=2)

    def protected(self, ctx: ScoreContext) -> Tensor | None:
        return sinks_and_recent(ctx, self.n_sink, 0) if self.n_sink else None

    def stats(self, ctx: ScoreContext) -> QueryStats:
        """Statistics of this forward's pre-RoPE queries past the sinks (pad queries, position -1, left out)."""
        weight = ctx.query_positions.to(ctx.keys.device) >= self.n_sink  # (B, q)
        return query_stats(ctx.queries(rope=False), weight)

    def value_norms(self, ctx: ScoreContext) -> Tensor:
        """(B, H_q, T): ||v|| of each slot's value, or ||W_O^h v|| through each query head's slice of o_proj."""
        v = ctx.values.float()  # (B, H, T, Dv)
        hq = ctx.adapter.n_q_heads
        if not self.use_output_projection:
            return v.norm(dim=-1).repeat_interleave(hq // v.shape[1], dim=1)
        w = ctx.adapter.output_projection(ctx.module).float()  # (H_q, Dv, hidden)
        gram = w @ w.transpose(-1, -2)  # (H_q, Dv, Dv): ||v W||^2 = v^T (W W^T) v, cheaper than v W
        vq = v.repeat_interleave(hq // v.shape[1], dim=1)  # (B, H_q, T, Dv)
        return ((vq @ gram) * vq).sum(dim=-1).clamp(min=0).sqrt()

"""The scoring half of the context replay (`kvsqueeze.replay`): one layer's running max of the attention its context
slots receive over the replay chunks (KVzip, KVzip+), and KVgrad's per-chunk backward pass that weighs each replay
query by the gradient norm of a hidden-state objective. The formulas are in `replay.py`'s module docstring.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kvsqueeze.cache import KVCache
from kvsqueeze.layer import KVLayer
from kvsqueeze.models import ModelAdapter

__all__ = ["LayerScorer", "ReplayGradients"]


class LayerScorer:
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


class ReplayGradients:
    """KVgrad's chunk step: what the forward leaves (each scored layer's queries and attention output o, the last
    decoder layer's output x^L), then one backward pass of Phi = sum_j ||x_j^L||^2 to weigh query j by ||dPhi/do_j||."""

    def __init__(self, scorers: list[LayerScorer], cache: KVCache) -> None:
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
            layer.detach()

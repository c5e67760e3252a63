"""Fast KVzip-style gates: a per-layer sink-attention gate g: R^hidden -> [0, 1]^H on each token's hidden state,
trained to rank pairs like KVzip+ (Kim, Han, Yun 2026, Fast KVzip, arXiv 2601.17668).

The paper (as far as its public abstract and summaries describe it) adds to every attention layer a lightweight gate
g_l: R^D -> [0, 1]^H (D the hidden size, H the KV heads) on the input hidden states, a "low-rank sink attention"
module, trained with forward passes of the frozen LLM to reproduce KVzip's reconstruction-based importance; pairs with
low gates are evicted, a recent window kept. Its exact architecture and loss were not available here; this is a
documented reading of it, distinct from the KVzap regressors:

    z_i = (h_i - mu) / sigma                        standardized hidden state of token i
    k_{h,i} = U_h^T z_i                             low-rank (`rank`) gate key of head h
    g_{h,i} = sigmoid(logsumexp_m(<q_{h,m}, k_{h,i}>) - s_h)

i.e. the attention a token would win against a learned sink (logit s_h) for `n_queries` learned gate queries q_{h,m}
(a softmax over {token, sink} is a sigmoid of their logit difference). Labels: the percentile rank, in [0, 1], of the
token's KVzip+ score among the tokens of its calibration document, per head; loss: binary cross-entropy with these
soft labels (a ranking target, insensitive to the scale of KVzip+ scores); Adam, seeded minibatches, deterministic.
Trained locally once per model and cached on disk (`kvsqueeze calibrate fastkvzip_gates`); the held-out Spearman
correlation with the true KVzip+ scores is stored with the artifact.

Selection: the gate logit (monotonic in g) ranks the slots, per-head top-k at floor(n(1-r)); with `threshold`, the
slots whose gate logit is at least that value and the `window` most recent are kept (`methods/_kvzap.py`). Scores only
a one-shot prefill (a forward on top of earlier slots raises a ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from kvsqueeze.methods._kvzap import (
    KVzapBase,
    init_weight,
    ranks,
    standardizer,
    train_adam,
)
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int

BATCH = 512


def percentile_labels(y: Tensor, doc: Tensor) -> Tensor:
    """(N, H) rank of each row's target among the rows of its document, per head, scaled to [0, 1]."""
    out = torch.zeros_like(y, dtype=torch.float32)
    for d in doc.unique().tolist():
        rows = doc == d
        n = int(rows.sum())
        for h in range(y.shape[1]):
            out[rows, h] = (ranks(y[rows, h]) / max(n - 1, 1)).float()
    return out


@register_method("fastkvzip_gates")
@dataclass
class FastKVzipGates(KVzapBase):
    """Sink-attention gates on each token's hidden state, trained to rank pairs like KVzip+ (trained locally)."""

    kind = "fastkvzip_gates"

    rank: int = 16  # dimension of the low-rank gate keys
    n_queries: int = 4  # learned gate queries per head
    steps: int = 300  # Adam steps per layer
    lr: float = 3e-3  # Adam learning rate

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank, 1, 4096)
        check_int("n_queries", self.n_queries, 1, 256)
        check_int("steps", self.steps, 1, 1_000_000)
        check_float("lr", self.lr, 1e-8, 10.0)

    def fit_settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "n_queries": self.n_queries, "steps": self.steps, "lr": float(self.lr)}

    def fit(self, x: Tensor, y: Tensor, doc: Tensor, seed: int) -> dict[str, Tensor]:
        mean, std = standardizer(x)
        xs = (x - mean) / std
        labels = percentile_labels(y, doc)
        h, r, m = y.shape[1], self.rank, self.n_queries
        gen = torch.Generator().manual_seed(seed)
        proj = init_weight(x.shape[1], h * r, gen)
        queries = (torch.randn(h, m, r, generator=gen) * r**-0.5).requires_grad_(True)
        sink = torch.zeros(h, requires_grad=True)
        params = {"mean": mean, "std": std, "proj": proj, "queries": queries, "sink": sink}

        def loss(rows: Tensor) -> Tensor:
            return F.binary_cross_entropy_with_logits(self._logits(params, xs[rows], standardized=True), labels[rows])

        train_adam([proj, queries, sink], loss, len(x), self.steps, float(self.lr), BATCH, seed)
        return {k: v.detach() for k, v in params.items()}

    @staticmethod
    def _logits(params: dict[str, Tensor], x: Tensor, standardized: bool = False) -> Tensor:
        z = x if standardized else (x.float() - params["mean"]) / params["std"]
        h, _, r = params["queries"].shape
        keys = (z @ params["proj"]).unflatten(-1, (h, r))  # (..., H, r)
        return torch.einsum("...hr,hmr->...hm", keys, params["queries"]).logsumexp(dim=-1) - params["sink"]

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return self._logits(params, x)

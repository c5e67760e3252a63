"""KVzap-MLP: a 2-layer MLP from each token's hidden state to its log KVzip+ score per KV head (Jegou, Jeblick 2026,
KVzap, arXiv 2601.07891).

The same surrogate as `kvzap_linear` (inputs: the attention block's input h_i; outputs: one predicted log-score per KV
head) with one hidden layer: s_i = W2^T gelu(W1^T (h_i - mu) / sigma + b1) + b2, `width` hidden units. Trained here
locally, once per model and cached on disk (`kvsqueeze calibrate kvzap_mlp`): mean squared error to the standardized
targets log(KVzip+ + 1e-10), Adam (`lr`, `steps` steps on seeded minibatches of 512 tokens; deterministic), the output
scale folded back so that predictions are log-scores; the held-out Spearman correlation is stored with the artifact.

Selection: per-head top-k at the uniform budget floor(n(1-r)), or the paper's threshold on the predicted log-score with
a recent window (`threshold`, `window`; see `kvzap_linear`). Scores only a one-shot prefill (a forward on top of earlier
slots raises a ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from kvsqueeze.methods._kvzap import KVzapBase, init_weight, standardizer, train_adam
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float, check_int

BATCH = 512


@register_method("kvzap_mlp")
@dataclass
class KVzapMLP(KVzapBase):
    """2-layer MLP from each token's hidden state to its predicted log KVzip+ score per head (trained locally)."""

    kind = "kvzap_mlp"

    width: int = 32  # hidden units
    steps: int = 300  # Adam steps per layer
    lr: float = 3e-3  # Adam learning rate

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("width", self.width, 1, 65536)
        check_int("steps", self.steps, 1, 1_000_000)
        check_float("lr", self.lr, 1e-8, 10.0)

    def fit_settings(self) -> dict[str, Any]:
        return {"width": self.width, "steps": self.steps, "lr": float(self.lr)}

    def fit(self, x: Tensor, y: Tensor, doc: Tensor, seed: int) -> dict[str, Tensor]:
        mean, std = standardizer(x)
        y_mean, y_std = standardizer(y)
        xs, ys = (x - mean) / std, (y - y_mean) / y_std
        gen = torch.Generator().manual_seed(seed)
        w1, w2 = init_weight(x.shape[1], self.width, gen), init_weight(self.width, y.shape[1], gen)
        b1 = torch.zeros(self.width, requires_grad=True)
        b2 = torch.zeros(y.shape[1], requires_grad=True)

        def loss(rows: Tensor) -> Tensor:
            return F.mse_loss(F.gelu(xs[rows] @ w1 + b1) @ w2 + b2, ys[rows])

        train_adam([w1, b1, w2, b2], loss, len(x), self.steps, float(self.lr), BATCH, seed)
        # fold the standardizations in: predict(x) = gelu(x @ W1' + b1') @ W2' + b2' gives log-scores
        return {
            "w1": (w1 / std[:, None]).detach(),
            "b1": (b1 - (mean / std) @ w1).detach(),
            "w2": (w2 * y_std[None, :]).detach(),
            "b2": (b2 * y_std + y_mean).detach(),
        }

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return F.gelu(x.float() @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

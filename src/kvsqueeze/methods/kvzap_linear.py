"""KVzap-Linear: a linear map from each token's hidden state to its log KVzip+ score per KV head (Jegou, Jeblick 2026,
KVzap, arXiv 2601.07891).

KVzap approximates KVzip+ (the replay score a_{q,j,i} ||v_i W_O^q|| / ||h_j||, see `kvsqueeze.replay`) without the
replay: a surrogate maps the input h_i (hidden size) of the attention block for token i to one predicted log-score per
KV head, s_i = W^T h_i + b, (T, hidden) -> (T, H). Trained here locally, once per model and cached on disk
(`kvsqueeze calibrate kvzap_linear`): targets log(KVzip+ + 1e-10) on documents of kvsqueeze's generic text, fitted by
ridge least squares in closed form (penalty `ridge` x the mean feature energy, bias unpenalized); the held-out
Spearman correlation with the true scores is stored with the artifact (`methods/_kvzap.py`).

Selection: per-head top-k at the uniform budget floor(n(1-r)), so that it compares with the other methods at equal
memory; or the paper's rule with `threshold` (tau) and `window`: prune the pairs whose predicted log-score falls below
tau, always keeping the most recent `window` (an adaptive size per head, `methods/_kvzap.py`). Scores only a one-shot
prefill (a forward on top of earlier slots raises a ValueError: their hidden states are gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvsqueeze.methods._kvzap import KVzapBase
from kvsqueeze.methods.registry import register_method
from kvsqueeze.validation import check_float


def ridge_fit(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """(weight (F, H), bias (H,)) minimizing ||x W + b - y||^2 + lam ||W||^2, lam = ridge * trace(Xc^T Xc) / F on the
    centered features Xc (closed form, float64)."""
    x, y = x.double(), y.double()
    xm, ym = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram + lam * eye + 1e-12 * eye, xc.T @ yc)
    return weight.float(), (ym - xm @ weight).float()


@register_method("kvzap_linear")
@dataclass
class KVzapLinear(KVzapBase):
    """Linear map from each token's hidden state to its predicted log KVzip+ score per head (trained locally)."""

    kind = "kvzap_linear"

    ridge: float = 1e-3  # ridge penalty relative to the mean feature energy

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("ridge", self.ridge, 0.0, 1e6)

    def fit_settings(self) -> dict[str, Any]:
        return {"ridge": float(self.ridge)}

    def fit(self, x: Tensor, y: Tensor, doc: Tensor, seed: int) -> dict[str, Tensor]:
        weight, bias = ridge_fit(x, y, float(self.ridge))
        return {"weight": weight, "bias": bias}

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return x.float() @ params["weight"] + params["bias"]

"""Shared plumbing of the learned KVzip+ predictors (kvzap_linear, kvzap_mlp, fastkvzip_gates).

Calibration data: the calibration text (`text`: kvsqueeze's generic prose, Python's documentation, docstrings or a mix
of the three, `kvsqueeze.corpus`; random ids for a model without a tokenizer) cut into `n_docs` documents of
`doc_tokens` tokens. Each document is prefilled alone into an empty KVCache, capturing the input of every full-attention
layer's attention block for every token (B, T, hidden; what `ScoreContext.hidden_states` holds during a one-shot
prefill); then `kvsqueeze.replay.kvzip_scores(..., variant="kvzip+")` gives the target of each (token, KV head):
log(score + 1e-10). The collection is kept in memory per model and documents: kvzap_linear, kvzap_mlp and
fastkvzip_gates calibrated in one process share it (`force` collects again). The last `heldout_docs` documents are never
trained on: the held-out Spearman rank correlation between prediction and target (per document and head, averaged; per
layer and their mean) is stored with the artifact and printed by `kvsqueeze calibrate`.

Selection: per-head top-k at the uniform budget floor(n(1-r)) by default, so that a predictor compares with the other
methods at equal memory; or, with `threshold`, the paper's rule: each (row, KV head) keeps the slots whose predicted
log-score is at least `threshold` and its `window` most recent slots, whatever their scores, so that how much each head
keeps adapts to the text (the ratio must then be 0; the heads' different lengths are stored ragged).

Inference needs the hidden state of every scored slot, which only exists for the tokens of the current forward: the
predictors score a one-shot prefill (every slot arrived in this forward). A forward on top of slots from earlier
forwards (chunked prefill, questions or decoding under `compress`) raises a ValueError: their hidden states are gone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvsqueeze.calibration import artifact_path, calibrated, calibration_ids, ids_digest, read_info, remembered
from kvsqueeze.corpus import CALIBRATION_TEXTS
from kvsqueeze.methods.base import ScoreContext, ScorerMethod, select, sinks_and_recent
from kvsqueeze.models import get_adapter
from kvsqueeze.replay import prompt_token_ids, replay_document
from kvsqueeze.validation import check_choice, check_float, check_int

logger = logging.getLogger("kvsqueeze")

LOG_EPS = 1e-10
VERSION = 1  # bump when the training recipe changes: part of the artifact key


# --- rank correlation -------------------------------------------------------------------------------------------------


def ranks(x: Tensor) -> Tensor:
    """0-based ranks of a 1-D tensor, ties get the mean of the ranks they span (float64)."""
    _, inverse, counts = torch.unique(x.double(), sorted=True, return_inverse=True, return_counts=True)
    start = counts.cumsum(0) - counts
    return (start.double() + (counts.double() - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson correlation of their tie-averaged ranks); 0.0 when
    either is constant."""
    if a.shape != b.shape or a.dim() != 1:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"spearman needs two 1-D tensors of the same length, got {shapes}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


# --- training helpers -------------------------------------------------------------------------------------------------


def standardizer(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) per feature of (N, F) rows; std floored so that constant features stay finite."""
    mean = x.mean(dim=0)
    return mean, x.std(dim=0, correction=0).clamp(min=1e-6)


def train_adam(
    params: list[Tensor], loss: Callable[[Tensor], Tensor], n: int, steps: int, lr: float, batch: int, seed: int
) -> float:
    """Minimize loss(row indices) over `params` (leaf tensors, requires_grad) with Adam on seeded minibatches of
    `batch` rows out of `n` (full batch when n <= batch); deterministic on CPU. Returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    last = float("nan")
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.arange(n) if n <= batch else torch.randint(0, n, (batch,), generator=gen)
            opt.zero_grad()
            value = loss(rows)
            value.backward()
            opt.step()
            last = float(value.detach())
    for p in params:
        p.requires_grad_(False)
    return last


def init_weight(fan_in: int, fan_out: int, gen: torch.Generator) -> Tensor:
    """(fan_in, fan_out) uniform in +-1/sqrt(fan_in), as torch's Linear default, from a seeded generator."""
    bound = fan_in**-0.5
    return ((torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound).requires_grad_(True)


# --- calibration data -------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Per full-attention layer: features (N, hidden) float32, targets (N, H) log KVzip+ scores; doc (N,) the
    document of each token."""

    features: dict[int, Tensor]
    targets: dict[int, Tensor]
    doc: Tensor


@torch.no_grad()
def collect(model: Any, docs: list[Tensor], desc: str = "KVzip+ targets") -> Dataset:
    """Prefill each document (1-D ids) alone, capture the attention blocks' inputs, replay it for KVzip+ scores."""
    layers = get_adapter(model).full_layers
    features: dict[int, list[Tensor]] = {i: [] for i in layers}
    targets: dict[int, list[Tensor]] = {i: [] for i in layers}
    for ids in tqdm(docs, desc=desc, unit="doc", file=sys.stderr, leave=False):
        inputs, scores = replay_document(model, ids, variant="kvzip+")
        for i in layers:
            features[i].append(inputs[i])
            targets[i].append((scores[i].float().cpu().T + LOG_EPS).log())  # (T, H)
    doc = torch.cat([torch.full((len(d),), k, dtype=torch.long) for k, d in enumerate(docs)])
    return Dataset({i: torch.cat(v) for i, v in features.items()}, {i: torch.cat(v) for i, v in targets.items()}, doc)


def heldout_spearman(predict: Callable[[int, Tensor], Tensor], data: Dataset, heldout: Tensor) -> dict[int, float]:
    """{layer: mean over held-out documents and KV heads of spearman(prediction, target)}; predict(layer, (n,
    hidden)) -> (n, H)."""
    out = {}
    for layer, x in data.features.items():
        values = []
        for d in heldout.tolist():
            rows = data.doc == d
            pred, true = predict(layer, x[rows]), data.targets[layer][rows]
            values += [spearman(pred[:, h], true[:, h]) for h in range(true.shape[1])]
        out[layer] = sum(values) / max(len(values), 1)
    return out


# --- the shared method base -------------------------------------------------------------------------------------------


@dataclass
class KVzapBase(ScorerMethod):
    """Shared options, calibration and inference of the learned KVzip+ predictors (subclasses: `kind`, `fit`,
    `predict`)."""

    needs = ("calibration",)
    kind = ""

    n_docs: int = 6  # calibration documents of generic text (the last `heldout_docs` are held out)
    doc_tokens: int = 512  # tokens per calibration document
    heldout_docs: int = 2  # documents used only to measure the held-out Spearman correlation
    seed: int = 0  # where the calibration text starts (and the training seed)
    text: str = "generic"  # calibration text (corpus.CALIBRATION_TEXTS): generic, python_docs, docstrings, mixed
    threshold: float | None = None  # keep the slots predicted at least this log-score (None: top-k at the ratio)
    window: int = 64  # with a threshold: the most recent slots each head keeps whatever their scores

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_docs", self.n_docs, 2, 10_000)
        check_int("doc_tokens", self.doc_tokens, 8, 1_000_000)
        check_int("heldout_docs", self.heldout_docs, 1, 10_000)
        if self.heldout_docs >= self.n_docs:
            high = self.n_docs - 1
            raise ValueError(f"heldout_docs must be in [1, n_docs - 1] = [1, {high}], got {self.heldout_docs}")
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_choice("text", self.text, CALIBRATION_TEXTS)
        check_float("threshold", self.threshold, finite=True, none_ok=True, note="a predicted log-score")
        check_int("window", self.window, 1, 1_000_000)
        if self.threshold is not None and self.ratio != 0:
            raise ValueError(
                f"threshold={self.threshold} decides how much each head keeps, so the ratio must be 0, got {self.ratio}"
            )

    # subclasses --------------------------------------------------------------------------------------------------
    def fit_settings(self) -> dict[str, Any]:
        """The options that change the trained predictor (part of the artifact key)."""
        return {}

    def fit(self, x: Tensor, y: Tensor, doc: Tensor, seed: int) -> dict[str, Tensor]:
        """Train one layer's predictor from features (N, hidden), log-score targets (N, H) and the document of each
        row (N,): its tensors."""
        raise NotImplementedError

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """(..., H) scores (higher = keep) from features (..., hidden)."""
        raise NotImplementedError

    # calibration -------------------------------------------------------------------------------------------------
    def _settings(self, model: Any, tokenizer: Any) -> tuple[dict[str, Any], list[Tensor]]:
        n = self.n_docs * self.doc_tokens
        ids, source = calibration_ids(model, n, self.seed, tokenizer, self.text)
        if len(ids) < n:
            raise ValueError(f"the calibration text gave {len(ids)} tokens, fewer than n_docs * doc_tokens = {n}")
        max_pos = get_adapter(model).max_positions
        needed = 2 * self.doc_tokens + len(prompt_token_ids(model, tokenizer=tokenizer))  # the document + its replay
        if max_pos is not None and needed > max_pos:
            raise ValueError(
                f"doc_tokens must leave room for the replay (2 x doc_tokens + the prompt = {needed} > {max_pos} "
                f"positions of the model), got {self.doc_tokens}"
            )
        settings = {
            "version": VERSION,
            "n_docs": self.n_docs,
            "doc_tokens": self.doc_tokens,
            "heldout_docs": self.heldout_docs,
            "seed": self.seed,
            "text": source,
            "ids": ids_digest(ids),
            **self.fit_settings(),
        }
        return settings, list(ids.split(self.doc_tokens))

    def _data_key(self) -> tuple[Any, ...]:
        """What the collected KVzip+ dataset depends on (not the predictor's kind or fit settings): the predictors
        calibrated with the same documents in one process share one collection."""
        return ("kvzip+ dataset", VERSION, self.n_docs, self.doc_tokens, self.seed, self.text)

    def _compute(self, model: Any, docs: list[Tensor], force: bool = False) -> dict[str, Tensor]:
        desc = f"{self.kind}: KVzip+ targets"
        data = remembered(model, self._data_key(), lambda: collect(model, docs, desc=desc), refresh=force)
        train_docs = len(docs) - self.heldout_docs
        train = data.doc < train_docs
        params: dict[int, dict[str, Tensor]] = {}
        for k, layer in enumerate(data.features):
            x, y = data.features[layer][train], data.targets[layer][train]
            params[layer] = self.fit(x, y, data.doc[train], self.seed + k)
        with torch.no_grad():
            rho = heldout_spearman(lambda i, x: self.predict(params[i], x), data, torch.arange(train_docs, len(docs)))
        tensors = {f"layer_{i}.{name}": t.float().contiguous() for i, p in params.items() for name, t in p.items()}
        layers = sorted(rho)
        tensors["heldout_spearman_layers"] = torch.tensor(layers, dtype=torch.long)
        tensors["heldout_spearman"] = torch.tensor([rho[i] for i in layers], dtype=torch.float64)
        return tensors

    def _calibrate(self, model: Any, tokenizer: Any, force: bool) -> tuple[Path, dict[int, dict[str, Tensor]]]:
        settings, docs = self._settings(model, tokenizer)
        tensors = calibrated(
            self.kind, model, settings, lambda: self._compute(model, docs, force), force=force, describe=_describe
        )
        params: dict[int, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("layer_"):
                layer, name = key.removeprefix("layer_").split(".", 1)
                params.setdefault(int(layer), {})[name] = t.float().cpu()
        return artifact_path(self.kind, model, settings), params

    def _key(self) -> tuple[Any, ...]:
        return (self.kind, self.n_docs, self.doc_tokens, self.heldout_docs, self.seed, self.text,
                *self.fit_settings().values())  # fmt: skip

    def calibrate(self, model: Any, tokenizer: Any = None, force: bool = False) -> Path:
        path, params = self._calibrate(model, tokenizer, force)
        remembered(model, self._key(), lambda: params, refresh=True)
        results = read_info(path).get("results", {})
        if "heldout_spearman_mean" in results:
            logger.info("%s held-out Spearman vs KVzip+: %.3f", self.kind, results["heldout_spearman_mean"])
        return path

    def parameters_for(self, model: Any) -> dict[int, dict[str, Tensor]]:
        """{layer: tensors} of the trained predictors, calibrated (or loaded from disk) on first use."""
        return remembered(model, self._key(), lambda: self._calibrate(model, None, False)[1])

    # inference ---------------------------------------------------------------------------------------------------
    def plan(self, ctx: ScoreContext) -> tuple[Tensor, Tensor] | None:
        if self.threshold is None:
            return super().plan(ctx)
        scores = self.score(ctx).float()
        recent = sinks_and_recent(ctx, 0, self.window) & ctx.valid
        keep = ((scores >= self.threshold) & ctx.valid) | recent
        if bool((keep == ctx.valid).all()):
            return None
        return select(scores, ctx.valid, keep.sum(dim=-1), recent)

    def score(self, ctx: ScoreContext) -> Tensor:  # (B, H, T)
        t = ctx.positions.shape[-1]
        q = ctx.hidden_states.shape[1]
        if q != t:
            raise ValueError(
                f"{self.name} scores slots from their hidden states, which exist only for the tokens of the current "
                f"forward: layer {ctx.layer_idx} holds {t} slots but this forward brought {q} tokens (use a one-shot "
                "prefill; chunked prefill and compression after later forwards are not supported)"
            )
        trained = self.parameters_for(ctx.adapter.model)[ctx.layer_idx]
        params = {k: v.to(ctx.hidden_states.device) for k, v in trained.items()}
        return self.predict(params, ctx.hidden_states.float()).transpose(1, 2)  # (B, T, H) -> (B, H, T)


def _describe(tensors: dict[str, Tensor]) -> dict[str, Any]:
    layers = tensors["heldout_spearman_layers"].tolist()
    values = tensors["heldout_spearman"].tolist()
    return {
        "heldout_spearman_mean": round(sum(values) / max(len(values), 1), 4),
        "heldout_spearman_per_layer": {str(i): round(v, 4) for i, v in zip(layers, values, strict=True)},
    }

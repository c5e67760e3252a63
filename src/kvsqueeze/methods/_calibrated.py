"""Plumbing shared by the methods calibrated on kvsqueeze's generic text (DuoAttention, LU-KV, Expected Attention
with calibrated statistics): their common options, the calibration token ids and the settings that key the artifact
on disk (`kvsqueeze.calibration.store`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kvsqueeze.calibration import calibration_ids, ids_digest
from kvsqueeze.models import get_adapter
from kvsqueeze.validation import check_int


def check_calibration_options(n_tokens: object, seed: object, calibration_chunk: object) -> None:
    check_int("n_tokens", n_tokens, 16, 1_000_000)
    check_int("seed", seed, 0, 2**31 - 1)
    check_int("calibration_chunk", calibration_chunk, 16, 1_000_000)


def calibration_setup(
    model: Any, tokenizer: Any, n_tokens: int, seed: int, calibration_chunk: int
) -> tuple[Tensor, int, dict[str, Any]]:
    """(ids (n_tokens,), chunk size capped by the model's max positions, settings dict keying the artifact)."""
    ids, source = calibration_ids(model, n_tokens, seed, tokenizer)
    chunk = min(calibration_chunk, get_adapter(model).max_positions or calibration_chunk)
    settings = {"n_tokens": n_tokens, "seed": seed, "chunk_size": chunk, "text": source, "ids": ids_digest(ids)}
    return ids, chunk, settings


def per_layer(tensors: dict[str, Tensor], prefix: str) -> dict[int, Tensor]:
    """{layer: tensor} from an artifact's "<prefix>_<layer>" entries, as float32 on CPU."""
    out = {}
    for name, t in tensors.items():
        head, _, layer = name.rpartition("_")
        if head == prefix:
            out[int(layer)] = t.float().cpu()
    return out

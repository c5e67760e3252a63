"""Plumbing shared by the methods calibrated on kvsqueeze's generic text (Q-Filters, DuoAttention, LU-KV, Expected
Attention with calibrated statistics): their common options, the calibration token ids and the settings that key the
artifact on disk (`kvsqueeze.calibration.store`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from kvsqueeze.calibration import calibration_ids, ids_digest
from kvsqueeze.corpus import CALIBRATION_TEXTS
from kvsqueeze.methods.base import Need, ScorerMethod
from kvsqueeze.models import get_adapter
from kvsqueeze.validation import check_choice, check_int


@dataclass
class CalibrationOptions(ScorerMethod):
    """The calibration options of a method calibrated on generic text, their checks and the setup they key.

    Used as the first base of a calibrated method, `class M(CalibrationOptions, Base)`: dataclass fields follow the
    reversed method resolution order, so these three come after Base's own, where the methods always had them (their
    reprs, and the artifact keys built from those reprs, stay the same). A method with options of its own keeps them in
    a dataclass base listed second (DuoAttentionOptions, LUKVOptions). It derives from ScorerMethod so that
    `__post_init__` runs Base's checks first, then these.
    """

    needs: ClassVar[tuple[Need, ...]] = ("calibration",)

    n_tokens: int = 4096  # calibration tokens of generic text
    seed: int = 0  # which generic text
    calibration_chunk: int = 1024  # tokens per calibration forward (capped by the model's max positions)
    text: str = "generic"  # calibration text (corpus.CALIBRATION_TEXTS): generic, python_docs, docstrings, mixed

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_tokens", self.n_tokens, 16, 1_000_000)
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_int("calibration_chunk", self.calibration_chunk, 16, 1_000_000)
        check_choice("text", self.text, CALIBRATION_TEXTS)

    def calibration_key(self) -> tuple[Any, ...]:
        """The calibration options, for the key a calibrated method remembers its artifact under in a process."""
        return self.n_tokens, self.seed, self.calibration_chunk, self.text

    def calibration_setup(self, model: Any, tokenizer: Any) -> tuple[Tensor, int, dict[str, Any]]:
        """(ids (n_tokens,), chunk size capped by the model's max positions, settings dict keying the artifact)."""
        ids, source = calibration_ids(model, self.n_tokens, self.seed, tokenizer, self.text)
        chunk = min(self.calibration_chunk, get_adapter(model).max_positions or self.calibration_chunk)
        settings = {
            "n_tokens": self.n_tokens,
            "seed": self.seed,
            "chunk_size": chunk,
            "text": source,
            "ids": ids_digest(ids),
        }
        return ids, chunk, settings


def per_layer(tensors: dict[str, Tensor], prefix: str) -> dict[int, Tensor]:
    """{layer: tensor} from an artifact's "<prefix>_<layer>" entries, as float32 on CPU."""
    out = {}
    for name, t in tensors.items():
        head, _, layer = name.rpartition("_")
        if head == prefix:
            out[int(layer)] = t.float().cpu()
    return out

"""A deterministic split of samples into a tune part and a held-out part.

Samples (a context and its questions) are split whole, so no context is seen on both sides. Each sample is ranked by
a hash of its content and the seed, so the split does not depend on the order samples come in, and the same data and
seed always give the same split; the first `round(n * tune_fraction)` samples of that ranking tune (at least one on
each side when there are two or more samples).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from kvsqueeze.bench.tasks import Sample

TUNE_SPLIT = "tune_split"  # dataset file stems: rows of the benchmark land in the groups dataset:<stem>
HELDOUT_SPLIT = "heldout_split"


def sample_key(sample: Sample) -> str:
    """A hash of what a sample asks: its context, questions, answers and how they are scored."""
    payload = [sample.context, list(sample.questions), [list(a) for a in sample.answers], sample.answer_prefix,
               sample.max_new_tokens, sample.metric]  # fmt: skip
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def split_samples(
    samples: Sequence[Sample], tune_fraction: float = 0.5, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """(tune, held-out) samples; see the module docstring."""
    if not 0.0 < tune_fraction < 1.0:
        raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction}")
    if len(samples) < 2:
        raise ValueError(f"need at least 2 samples to tune on some and report on others, got {len(samples)}")
    ranked = sorted(samples, key=lambda s: hashlib.sha256(f"{seed}:{sample_key(s)}".encode()).hexdigest())
    n_tune = min(len(ranked) - 1, max(1, round(len(ranked) * tune_fraction)))
    return ranked[:n_tune], ranked[n_tune:]


def write_split(samples: Sequence[Sample], path: Path) -> Path:
    """The samples as a benchmark dataset file (JSONL, one row per question; `bench.dataset` reads it back)."""
    lines = []
    for s in samples:
        for question, answers in zip(s.questions, s.answers, strict=True):
            row = {"context": s.context, "question": question, "answers": list(answers),
                   "answer_prefix": s.answer_prefix, "max_new_tokens": s.max_new_tokens, "metric": s.metric,
                   "source": f"{s.task}#{s.index}"}  # fmt: skip
            lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # unchanged: keep the file as it is
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path

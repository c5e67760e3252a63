"""RULER string-match metrics: is each reference contained in the prediction (case-insensitive)?

`all`: the fraction of references found (RULER's niah/vt/cwe/fwe); `any`: 1 if at least one is found (QA).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal


def score(prediction: str, references: Sequence[str], metric: Literal["all", "any"]) -> float:
    """Score one prediction against its references, in [0, 1]."""
    if metric not in ("all", "any"):
        raise ValueError(f"metric must be 'all' or 'any', got {metric!r}")
    if not references:
        raise ValueError("a question needs at least one reference answer")
    text = prediction.lower()
    found = [ref.lower() in text for ref in references]
    return float(any(found)) if metric == "any" else sum(found) / len(found)

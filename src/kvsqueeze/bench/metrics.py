"""Scoring answers by string match, as RULER does (Hsieh et al. 2024, arXiv 2404.06654).

A reference counts as found when it is contained in the prediction after normalization (Unicode NFKC, case folding,
runs of whitespace collapsed to one space, ends stripped). Per question:

- "all" (RULER's string_match_all): the FRACTION of references found, so returning 3 of 4 values scores 0.75;
- "any" (RULER's string_match_part, used for QA): 1.0 if at least one reference is found, else 0.0.

Scores are in [0, 1]; a sample's score is the mean over its questions (`sample_score`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from kvsqueeze.bench.tasks.base import Sample
from kvsqueeze.validation import check_choice

METRICS = ("all", "any")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def score(prediction: str, references: Sequence[str], metric: str = "all") -> float:
    """Score one prediction against its references: fraction found ("all") or any found ("any")."""
    check_choice("metric", metric, METRICS)
    if isinstance(references, str):
        raise ValueError(f"references must be a list of strings, not one string ({references!r})")
    if not references:
        raise ValueError("references must not be empty: nothing to score against")
    refs = [normalize(str(r)) for r in references]
    if any(not r for r in refs):
        raise ValueError(f"references must not be blank (a blank reference matches anything): {list(references)!r}")
    pred = normalize(prediction or "")
    found = [r in pred for r in refs]
    return sum(found) / len(found) if metric == "all" else float(any(found))


def question_scores(sample: Sample, predictions: Sequence[str]) -> list[float]:
    """One score per question of `sample`, with the sample's metric."""
    if isinstance(predictions, str) or len(predictions) != len(sample.questions):
        n = 1 if isinstance(predictions, str) else len(predictions)
        raise ValueError(f"sample {sample.task}#{sample.index} has {len(sample.questions)} questions, got {n} answers")
    return [score(p, refs, sample.metric) for p, refs in zip(predictions, sample.answers, strict=True)]


def sample_score(sample: Sample, predictions: Sequence[str]) -> float:
    """The mean of `question_scores`."""
    scores = question_scores(sample, predictions)
    return sum(scores) / len(scores)

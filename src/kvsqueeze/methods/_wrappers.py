"""Plumbing shared by the budget-policy wrappers (Ada-KV, CriticalKV, global and per-layer budgets): the wrapped
scorer can be given as a method or by name (`--option scorer=knorm` on the command line) and gets the wrapper's
ratio."""

from __future__ import annotations

import dataclasses

from kvsqueeze.methods.base import ScorerMethod, check_ratio
from kvsqueeze.methods.registry import get_method


def wrapped_scorer(scorer: object, ratio: float, per_head: bool = True) -> ScorerMethod:
    """The scorer a wrapper uses: a ScorerMethod (or a registered name) carrying the wrapper's ratio; with
    `per_head`, only scorers with per-head budgets (`budget_scope == "head"`)."""
    check_ratio(ratio)
    if isinstance(scorer, str):
        scorer = get_method(scorer)
    if not isinstance(scorer, ScorerMethod):
        raise ValueError(f"scorer must be a scoring method (e.g. 'knorm', 'adakv'), got {scorer!r}")
    if per_head and type(scorer).budget_scope != "head":
        raise ValueError(f"scorer must be a scoring method with per-head budgets (e.g. 'knorm'), got {scorer!r}")
    return dataclasses.replace(scorer, ratio=ratio)

"""Tuning: the most compression that keeps quality on the user's data (`kvsqueeze tune`, `kvs.tune`; the package is
named `tuning` so that `kvsqueeze.tune` stays the function)."""

from kvsqueeze.tuning.config import TUNE_FILE, TuneChoice, read_choice, write_choice
from kvsqueeze.tuning.runner import DEFAULT_CANDIDATES, TuneResult, TuneSpec, tune

__all__ = [
    "DEFAULT_CANDIDATES",
    "TUNE_FILE",
    "TuneChoice",
    "TuneResult",
    "TuneSpec",
    "read_choice",
    "tune",
    "write_choice",
]

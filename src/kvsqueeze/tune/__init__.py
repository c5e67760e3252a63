"""Tuning: the most compression that keeps quality on the user's data (`kvsqueeze tune`, `kvs.tune`)."""

from kvsqueeze.tune.config import TUNE_FILE, TuneChoice, read_choice, write_choice
from kvsqueeze.tune.runner import DEFAULT_CANDIDATES, TuneResult, TuneSpec, tune

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

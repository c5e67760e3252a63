"""Compression methods. Importing this package registers every built-in method: each module in this folder other
than the plumbing (base, registry) holds one method and is imported here, so adding a method is adding a file."""

import importlib
import pkgutil

from kvsqueeze.methods.base import Method, ScoreContext, ScorerMethod, select
from kvsqueeze.methods.registry import METHODS, describe_methods, get_method, list_methods, register_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "Method",
    "ScoreContext",
    "ScorerMethod",
    "describe_methods",
    "get_method",
    "list_methods",
    "register_method",
    "select",
]

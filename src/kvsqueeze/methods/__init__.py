"""Compression methods. Importing this package registers every built-in method."""

from kvsqueeze.methods import knorm, pyramidkv, random, snapkv, streaming_llm  # noqa: F401  (registration)
from kvsqueeze.methods.base import Method, ScoreContext, ScorerMethod, select
from kvsqueeze.methods.registry import METHODS, describe_methods, get_method, list_methods, register_method

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

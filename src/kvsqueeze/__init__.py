"""kvsqueeze: KV cache compression for Hugging Face causal LMs that frees memory for real.

The public API is re-exported here lazily, so `import kvsqueeze` stays cheap (torch and transformers load on first
use) and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "KVCache": "kvsqueeze.cache",
    "CacheStats": "kvsqueeze.memory",
    "cache_bytes": "kvsqueeze.memory",
    "cache_stats": "kvsqueeze.memory",
    "Method": "kvsqueeze.methods",
    "ScorerMethod": "kvsqueeze.methods",
    "ScoreContext": "kvsqueeze.methods",
    "get_method": "kvsqueeze.methods",
    "list_methods": "kvsqueeze.methods",
    "describe_methods": "kvsqueeze.methods",
    "register_method": "kvsqueeze.methods",
    "attach": "kvsqueeze.hooks",
    "compress": "kvsqueeze.press",
    "generate": "kvsqueeze.pipeline",
    "GenerateOutput": "kvsqueeze.pipeline",
    "GenerationStats": "kvsqueeze.pipeline",
    "load_model": "kvsqueeze.loading",
    "Conversation": "kvsqueeze.conversation",
    "DecodingCompression": "kvsqueeze.methods.decoding",
    "save_cache": "kvsqueeze.cachefile",
    "load_cache": "kvsqueeze.cachefile",
    "get_adapter": "kvsqueeze.models",
    "register_pipeline": "kvsqueeze.hf_pipeline",
    "tune": "kvsqueeze.tuning",
    "TuneSpec": "kvsqueeze.tuning",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from kvsqueeze.cache import KVCache
    from kvsqueeze.cachefile import load_cache, save_cache
    from kvsqueeze.conversation import Conversation
    from kvsqueeze.hf_pipeline import register_pipeline
    from kvsqueeze.hooks import attach
    from kvsqueeze.loading import load_model
    from kvsqueeze.memory import CacheStats, cache_bytes, cache_stats
    from kvsqueeze.methods import (
        Method,
        ScoreContext,
        ScorerMethod,
        describe_methods,
        get_method,
        list_methods,
        register_method,
    )
    from kvsqueeze.methods.decoding import DecodingCompression
    from kvsqueeze.models import get_adapter
    from kvsqueeze.pipeline import GenerateOutput, GenerationStats, generate
    from kvsqueeze.press import compress
    from kvsqueeze.tuning import TuneSpec, tune


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvsqueeze' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

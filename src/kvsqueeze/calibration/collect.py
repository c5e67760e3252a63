"""Run a model over calibration text and collect per-layer tensors from its attention modules (forward hooks).

The text is kvsqueeze's generic prose (`kvsqueeze.text`), tokenized with the model's own tokenizer when one can be
found (passed in, or saved with the model at `model.name_or_path`); a model without one (an in-memory test model)
gets seeded random token ids instead, and a warning. The ids are cut into independent chunks (each starts at position
0, no cache), so memory stays bounded; a tqdm bar on stderr shows progress.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kvsqueeze.corpus import CALIBRATION_TEXTS, calibration_text
from kvsqueeze.hooks import detached
from kvsqueeze.models import ModelAdapter, apply_rope, get_adapter
from kvsqueeze.validation import check_choice

logger = logging.getLogger("kvsqueeze")


@dataclass
class AttentionCall:
    """What one attention module received in one calibration forward."""

    layer_idx: int
    module: nn.Module
    adapter: ModelAdapter
    hidden_states: Tensor  # (B, T, hidden)
    position_embeddings: tuple[Tensor, Tensor]  # cos, sin (B, T, R)

    def queries(self, rope: bool = True) -> Tensor:
        """(B, H_q, T, D) queries of this layer, after RoPE (default) or before it."""
        pre = self.adapter.pre_rope_queries(self.module, self.hidden_states)
        return apply_rope(pre, *self.position_embeddings) if rope else pre

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """(B, H, T, D) keys after RoPE and (B, H, T, Dv) values of this layer, as a cache would hold them."""
        keys, values = self.adapter.pre_rope_keys_values(self.module, self.hidden_states)
        return apply_rope(keys, *self.position_embeddings), values


def find_tokenizer(model: nn.Module) -> Any | None:
    """The tokenizer saved with the model (`model.name_or_path`: a local directory, or a hub id already in the local
    hub cache; never downloaded), or None."""
    source = str(getattr(model, "name_or_path", "") or "")
    if not source:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, local_files_only=not os.path.isdir(source))
    except Exception:  # no tokenizer files there: fall back to random ids
        return None


def calibration_ids(
    model: nn.Module, n_tokens: int, seed: int, tokenizer: Any | None = None, text: str = "generic"
) -> tuple[Tensor, str]:
    """(ids (n_tokens,), source) of the calibration `text` (`corpus.CALIBRATION_TEXTS`); source is "text" for the
    generic prose (the name calibration artifacts have always carried), the text's name for the others, or "random"
    when no tokenizer is found (random ids, whatever `text`)."""
    check_choice("text", text, CALIBRATION_TEXTS)
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
    if tokenizer is None:
        logger.warning(
            "No tokenizer found for %s: calibrating on random token ids. Load the model from a directory that holds "
            "its tokenizer (or pass one) for meaningful calibration.",
            type(model).__name__,
        )
        vocab = int(model.config.get_text_config(decoder=True).vocab_size)  # type: ignore[union-attr, operator]
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (n_tokens,), generator=gen), "random"
    ids = tokenizer(calibration_text(tokenizer, n_tokens, seed, text), add_special_tokens=False)["input_ids"][:n_tokens]
    return torch.tensor(ids, dtype=torch.long), "text" if text == "generic" else text


def ids_digest(ids: Tensor) -> str:
    """A short hash of token ids (part of a calibration key: another tokenizer gives other ids, another artifact)."""
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def collect_attention(
    model: Any,
    ids: Tensor,
    reduce: Callable[[AttentionCall], Tensor],
    chunk_size: int = 1024,
    layers: list[int] | None = None,
    desc: str = "calibrating",
) -> dict[int, list[Tensor]]:
    """Run `model` over `ids` (N,) in chunks of `chunk_size` and return, per layer, the list of `reduce(call)` results
    (one per chunk). `layers` defaults to every layer."""
    adapter = get_adapter(model)
    layers = list(range(adapter.n_layers)) if layers is None else layers
    out: dict[int, list[Tensor]] = {i: [] for i in layers}

    def make(layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            call = AttentionCall(layer_idx, module, adapter, hidden, kwargs["position_embeddings"])
            out[layer_idx].append(reduce(call))

        return hook

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    chunks = ids.reshape(-1).split(chunk_size)
    handles = [adapter.attention_modules[i].register_forward_hook(make(i), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad(), detached(model):
            for chunk in tqdm(chunks, desc=desc, unit="chunk", file=sys.stderr, leave=False):
                model.base_model(input_ids=chunk[None].to(device), use_cache=False)  # no LM head: not needed
    finally:
        for handle in handles:
            handle.remove()
    return out

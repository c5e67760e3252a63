"""KVzip: keep the pairs the model needs to repeat the context (Kim, Kim, Kwon, Lee, Yun, Song 2025, arXiv
2505.23416); KVzip+ rescales that attention by value and hidden-state norms (Jegou, Jeblick 2026, KVzap, arXiv
2601.07891).

After the prefill, the model reads "Repeat the previous context exactly." + the context again on top of the
uncompressed cache (`kvsqueeze.replay.kvzip_scores`); a pair's score is the most attention any replay query of its
GQA group pays it (KVzip+: a_{q,j,i} ||v_i W_O^q|| / ||h_j||). One budget for the whole model, floor(n(1-r)) per
(layer, head) pooled per row, goes to the best scores of all full-attention layers and heads (bottom-k eviction
across layers and heads, as the paper does). Query-agnostic, about 2-3x the prefill's compute.

The replay needs the model and the context's ids, so it runs when `compress` ends a forward (`before_plan`), only on
the forward that filled an empty cache (one-shot prefill): a chunked prefill or a later forward (questions, decoding)
under `compress` raises a ValueError, as does `compress_recording` (it has no model to replay with). Ratio 0 keeps
everything without replaying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvsqueeze.methods.base import (
    LayerScores,
    ModelForward,
    ModelScopeMethod,
    ScoreContext,
    check_ratio,
    uniform_budget,
)
from kvsqueeze.methods.global_budget import pooled_plans
from kvsqueeze.methods.registry import register_method
from kvsqueeze.replay import DEFAULT_PROMPT, prompt_token_ids
from kvsqueeze.validation import check_int


@register_method("kvzip")
@dataclass
class KVzip(ModelScopeMethod):
    """Keep the pairs most attended while the model repeats the context; one budget for all layers and heads."""

    needs = ("model",)
    shared_prefill = False  # extra forwards with the model: the benchmark runs it for real
    variant: ClassVar[str] = "kvzip"

    ratio: float = 0.0
    chunk_size: int = 256  # replay tokens per forward (memory: one chunk x T attention block per layer)
    prompt: str = DEFAULT_PROMPT  # the reconstruction instruction, tokenized with the model's tokenizer

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_int("chunk_size", self.chunk_size, 1)
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {self.prompt!r}")

    def layer_scores(self, ctx: ScoreContext) -> LayerScores:
        """The layer's budget and real slots; its scores come from the replay (`before_plan`), NaN until then."""
        valid = ctx.valid
        budget = torch.minimum(uniform_budget(ctx.seen, self.ratio, valid.shape[1]).to(valid.device), valid.sum(-1))
        fill = 0.0 if self.ratio == 0 else float("nan")
        return LayerScores(torch.full(valid.shape, fill, device=valid.device), valid, None, budget)

    def before_plan(self, forward: ModelForward, layers: dict[int, LayerScores]) -> None:
        if self.ratio == 0:
            return
        ids = forward.input_ids
        if ids is None:
            raise ValueError(f"{self.name} replays the context's token ids: call the model with input_ids")
        if forward.tokens_before != 0:
            raise ValueError(
                f"{self.name} compresses a whole context in the forward that fills an empty cache, but this forward "
                f"added {ids.shape[1]} tokens to a cache that held {forward.tokens_before} (chunked "
                "prefill, questions or decoding under compress): prefill the context in one forward (no chunk_size)"
            )
        mask = forward.attention_mask
        scores = forward.replay(
            ids,
            self.variant,
            attention_mask=None if mask is None else mask[:, -ids.shape[1] :],
            prompt_ids=prompt_token_ids(forward.model, self.prompt),
            chunk_size=self.chunk_size,
        )
        for idx, layer in layers.items():
            layer.scores = scores[idx].masked_fill(~layer.valid, float("-inf"))

    def plan_model(self, layers: dict[int, LayerScores]) -> dict[int, tuple[Tensor, Tensor] | None]:
        if any(bool(torch.isnan(layer.scores).any()) for layer in layers.values()):
            raise ValueError(
                f"{self.name} scores come from replaying the context with the model: run it inside "
                "kvsqueeze.compress (compress_recording cannot replay)"
            )
        return pooled_plans(layers)


@register_method("kvzip_plus")
@dataclass
class KVzipPlus(KVzip):
    """KVzip+: replay attention divided by the query's hidden-state norm, times ||v W_O|| (KVzap's oracle)."""

    variant: ClassVar[str] = "kvzip+"

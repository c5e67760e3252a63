"""`KVCache.concat_rows`: rows of different caches (other contexts, lengths, methods, layouts) decoded side by side in
one batch go on exactly as they would alone: the same greedy tokens, logits within float rounding, each row at its
own positions; rows then leave with `select_rows`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from kvsqueeze.cache import KVCache
from kvsqueeze.methods import get_method
from kvsqueeze.methods.base import Method
from kvsqueeze.methods.knorm import KNorm
from kvsqueeze.pipeline import prefill
from kvsqueeze.press import compress
from kvsqueeze.quantization import QuantSpec
from tests.helpers import ids_of
from tests.tiny import tiny_model

STEPS = 6
QUESTION = [11, 12, 13]  # the same few question tokens after every context


def context(model: Any, n: int, seed: int, method: Method | None, quant: QuantSpec | None = None) -> KVCache:
    ids = ids_of(n, seed)
    return prefill(model, ids, torch.ones_like(ids), method, quant=quant)[0]


@torch.no_grad()
def forward(model: Any, cache: KVCache, ids: Tensor) -> Tensor:
    """The last logits (R, V) of one forward of `ids` (R, q) over `cache`, through kvsqueeze's attention."""
    with compress(model, None):
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def alone(model: Any, cache: KVCache) -> tuple[list[int], list[Tensor]]:
    """Greedy tokens and each step's logits of one row decoded by itself (a copy of the cache)."""
    work = cache.select_rows(torch.tensor([0]))
    logits = [forward(model, work, torch.tensor([QUESTION]))]
    tokens = [int(logits[-1].argmax())]
    for _ in range(STEPS):
        logits.append(forward(model, work, torch.tensor([[tokens[-1]]])))
        tokens.append(int(logits[-1].argmax()))
    return tokens, [row[0] for row in logits]


def together(model: Any, caches: list[KVCache]) -> tuple[list[list[int]], list[Tensor]]:
    """Each row's question forward alone, then the rows joined and decoded as one batch: (tokens, logits (R, V))."""
    works = [c.select_rows(torch.tensor([0])) for c in caches]
    first = [forward(model, w, torch.tensor([QUESTION]))[0] for w in works]
    tokens = [[int(f.argmax())] for f in first]
    logits = [torch.stack(first)]
    batch = works[0].concat_rows(works[1:])
    for _ in range(STEPS):
        logits.append(forward(model, batch, torch.tensor([[t[-1]] for t in tokens])))
        for row, tok in zip(tokens, logits[-1].argmax(dim=-1).tolist(), strict=True):
            row.append(tok)
    return tokens, logits


def check_rows_go_on_alone(model: Any, caches: list[KVCache]) -> None:
    batched, logits = together(model, caches)
    for i, cache in enumerate(caches):
        tokens, own = alone(model, cache)
        assert batched[i] == tokens, f"row {i}"
        for step, want in enumerate(own):
            torch.testing.assert_close(logits[step][i], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers beside the full ones
def test_rows_of_different_contexts_and_methods_decode_as_alone(family: str) -> None:
    model = tiny_model(family)
    caches = [
        context(model, 40, 0, get_method("knorm", ratio=0.5)),  # rectangular
        context(model, 23, 1, None),  # uncompressed, shorter
        context(model, 57, 2, get_method("adakv", ratio=0.6, scorer=KNorm())),  # ragged: heads keep different counts
        context(model, 31, 3, get_method("snapkv", ratio=0.25, window=8)),
    ]
    assert [c.full_layers()[0].is_ragged for c in caches] == [False, False, True, False]
    check_rows_go_on_alone(model, caches)


def test_quantized_rows_decode_as_alone() -> None:
    model = tiny_model("llama")
    spec = QuantSpec(bits=4, group_size=8, residual=4)
    caches = [
        context(model, 45, 0, get_method("knorm", ratio=0.5), spec),
        context(model, 20, 1, None, spec),
        context(model, 60, 2, get_method("adakv", ratio=0.5, scorer=KNorm()), spec),
    ]
    check_rows_go_on_alone(model, caches)


def test_rows_with_thin_keys_or_re_rotated_keys_decode_as_alone() -> None:
    model = tiny_model("llama")
    thin = [context(model, n, seed, get_method("think", key_channel_ratio=0.5)) for n, seed in ((40, 0), (25, 1))]
    check_rows_go_on_alone(model, thin)
    moved = context(model, 48, 2, get_method("keyrerotation", ratio=0.5, scorer=KNorm()))  # a position offset
    assert moved.position_offset is not None
    check_rows_go_on_alone(model, [context(model, 30, 3, None), moved])


def test_rows_keep_their_positions_and_leave_with_select_rows() -> None:
    model = tiny_model("llama")
    short, long = context(model, 12, 0, None), context(model, 50, 1, get_method("knorm", ratio=0.5))
    batch = short.concat_rows([long, short])
    assert batch.next_positions().tolist() == [12, 50, 12]  # each row continues at its uncompressed length
    assert batch.batch_size == 3
    forward(model, batch, torch.tensor([[7], [8], [9]]))
    assert batch.next_positions().tolist() == [13, 51, 13]
    left = batch.select_rows(torch.tensor([1]))  # the short rows leave
    tokens_after = forward(model, left, torch.tensor([[5]]))
    reference = long.select_rows(torch.tensor([0]))
    forward(model, reference, torch.tensor([[8]]))
    torch.testing.assert_close(tokens_after, forward(model, reference, torch.tensor([[5]])), atol=2e-5, rtol=1e-4)


def test_rows_that_cannot_sit_together_say_why() -> None:
    model = tiny_model("llama")
    plain = context(model, 20, 0, None)
    quantized = context(model, 20, 0, None, QuantSpec(bits=4, group_size=8, residual=4))
    with pytest.raises(ValueError, match="cannot join these rows: layer 0: one layer is quantized with None"):
        plain.concat_rows([quantized])
    thin = context(model, 20, 0, get_method("think", key_channel_ratio=0.5))
    assert "keep None and 8 key channels" in str(plain.concat_problem(thin))
    assert thin.concat_problem(context(model, 30, 1, get_method("think", key_channel_ratio=0.5))) is None
    thinner = context(model, 30, 1, get_method("think", key_channel_ratio=0.75))
    assert "keep 8 and 4 key channels" in str(thin.concat_problem(thinner))
    assert plain.concat_problem(context(model, 30, 1, get_method("knorm", ratio=0.5))) is None
    with pytest.raises(ValueError, match="another model"):
        plain.concat_rows([context(tiny_model("llama", num_hidden_layers=2), 20, 0, None)])

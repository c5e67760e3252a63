"""Block-wise streaming eviction: kept + next block scored by the wrapped scorer, cut back to the budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.methods.block import BlockWise
from kvsqueeze.methods.keydiff import KeyDiff
from kvsqueeze.methods.snapkv import SnapKV
from tests.helpers import ids_of, kept_positions, prefill
from tests.unit.methods.helpers import budget, fake_ctx


def _keydiff_reference(keys: torch.Tensor, block: int, k: int) -> list[int]:
    """Kept positions of one head by a loop: KeyDiff over the visible candidates only, blocks ending at the end."""
    t = keys.shape[0]
    kept: list[int] = []
    for end in list(range(t, 0, -block))[::-1]:
        cand = kept + list(range(max(0, end - block), end))
        if len(cand) > k:
            unit = [F.normalize(keys[p].double(), dim=0) for p in cand]
            anchor = torch.stack(unit).mean(dim=0)
            score = {p: -float(F.cosine_similarity(keys[p].double(), anchor, dim=0)) for p in cand}
            cand = sorted(cand, key=lambda p: (-score[p], p))[:k]
        kept = sorted(cand)
    return kept


@pytest.mark.parametrize(("t", "ratio", "block"), [(30, 0.5, 7), (23, 0.75, 4), (16, 0.3, 16)])
def test_block_over_keydiff_matches_a_loop(t, ratio, block):
    keys = torch.randn(1, 2, t, 8, generator=torch.Generator().manual_seed(t))
    ctx = fake_ctx(keys)
    ctx.query_positions = torch.arange(t)[None]  # all slots are this forward's new tokens
    ctx.hidden_states = torch.zeros(1, t, 8)
    indices, counts = BlockWise(ratio, scorer=KeyDiff(), block_size=block).plan(ctx)
    for h in range(2):
        assert indices[0, h, : counts[0, h]].tolist() == _keydiff_reference(keys[0, h], block, budget(t, ratio))


def test_one_block_is_the_wrapped_scorer(make_model):
    model = make_model("llama")
    plain = prefill(model, ids_of(40), SnapKV(0.5, window=8))
    block = prefill(model, ids_of(40), BlockWise(0.5, scorer=SnapKV(window=8), block_size=64))
    for a, b in zip(plain.full_layers(), block.full_layers(), strict=True):
        assert torch.equal(a.positions, b.positions)


def test_small_blocks_stream_snapkv(make_model):
    """SnapKV with blocks of 10: each block's own last tokens are its window, so every block's window was kept while
    it was the newest block only if it still wins afterwards; the final window (the last 8 tokens) is always kept."""
    model = make_model("llama")
    cache = prefill(model, ids_of(40), BlockWise(0.5, scorer=SnapKV(window=8), block_size=10))
    plain = prefill(model, ids_of(40), SnapKV(0.5, window=8))
    differs = False
    for layer, ref in zip(cache.full_layers(), plain.full_layers(), strict=True):
        for h in range(2):
            kept = kept_positions(layer, 0, h)
            assert len(kept) == 20 and set(range(32, 40)) <= set(kept)
            differs |= kept != kept_positions(ref, 0, h)
    assert differs  # streaming decisions are not the one-shot ones


def test_scorer_by_name_and_bad_block_size():
    assert isinstance(BlockWise(0.5, scorer="keydiff").scorer, KeyDiff)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        BlockWise(0.5, block_size=0)
    with pytest.raises(ValueError, match="scorer"):
        BlockWise(0.5, scorer="global_budget")

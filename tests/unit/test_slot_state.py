"""Per-slot method state in KVLayer (H2O's accumulated attention): it follows appends, pruning (rectangular and
ragged) and row selection, and is read/written in the layout of `view()`."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import step
from kvsqueeze.cache import KVLayer


def _layer(b: int = 2, h: int = 2, t: int = 5) -> KVLayer:
    layer = KVLayer()
    layer.query_positions = torch.arange(t).expand(b, t)
    layer.update(torch.randn(b, h, t, 4), torch.randn(b, h, t, 4))
    layer.finish_step()
    step.clear_updated()
    return layer


def _append(layer: KVLayer, positions: torch.Tensor) -> None:
    b, q = positions.shape
    layer.query_positions = positions
    layer.update(torch.randn(b, 2, q, 4), torch.randn(b, 2, q, 4))
    step.clear_updated()


def test_state_follows_appends_and_rectangular_pruning():
    layer = _layer()
    state = layer.positions.float() * 10 + torch.arange(2)[None, :, None]  # (B, H, T) distinct per slot
    layer.write_slot_state("s", state)
    _append(layer, torch.tensor([[5], [5]]))
    assert layer.read_slot_state("s")[..., -1].eq(0).all()  # new tokens start at 0
    layer.prune(torch.tensor([[[0, 2, 5]] * 2] * 2), torch.full((2, 2), 3))
    assert layer.read_slot_state("s")[0, 1].tolist() == [1.0, 21.0, 0.0]
    assert layer.read_slot_state("s")[1, 0].tolist() == [0.0, 20.0, 0.0]


def test_state_follows_ragged_pruning_appends_and_row_selection():
    layer = _layer()
    layer.write_slot_state("s", layer.positions.float() + 100 * torch.arange(2)[:, None, None])
    indices = torch.tensor([[[1, 3, 4], [0, 0, 0]], [[2, 0, 0], [0, 1, 0]]])
    layer.prune(indices, torch.tensor([[3, 1], [1, 2]]))  # uneven: the layer becomes ragged
    assert layer.is_ragged
    _append(layer, torch.tensor([[5], [5]]))
    state, pos = layer.read_slot_state("s"), layer.view()[2]
    held = [[state[b, h][pos[b, h] >= 0].tolist() for h in range(2)] for b in range(2)]
    assert held == [[[1.0, 3.0, 4.0, 0.0], [0.0, 0.0]], [[102.0, 0.0], [100.0, 101.0, 0.0]]]
    one = layer.select_rows(torch.tensor([1, 1]))
    s1, p1 = one.read_slot_state("s"), one.view()[2]
    assert [s1[r, 1][p1[r, 1] >= 0].tolist() for r in range(2)] == [[100.0, 101.0, 0.0]] * 2


def test_rectangular_row_selection_and_shape_check():
    layer = _layer()
    layer.write_slot_state("s", layer.positions.float() + 7 * torch.arange(2)[:, None, None])
    copy = layer.select_rows(torch.tensor([1]))
    assert torch.equal(copy.read_slot_state("s")[0, 0], torch.arange(5.0) + 7)
    with pytest.raises(ValueError, match="does not match"):
        layer.write_slot_state("s", torch.zeros(2, 2, 4))

"""The shared test helpers (tests/helpers.py) read a ragged layer exactly as they read a rectangular one."""

from __future__ import annotations

import torch

from tests.helpers import (
    full_layer_positions,
    ids_of,
    kept_by_layer,
    kept_counts,
    kept_positions,
    kept_total,
    prefill,
)


def test_kept_reads_agree_on_rectangular_and_ragged_layers(make_model):
    model = make_model("llama")
    cache = prefill(model, ids_of(12))
    assert kept_positions(cache.layer(0), 0, 1) == list(range(12))
    # heads keep different counts: layer 0 turns ragged, the others stay rectangular
    cache.layer(0).prune(torch.tensor([[[2, 5, 9], [0, 11, 0]]]), torch.tensor([[3, 2]]))
    assert cache.layer(0).is_ragged and not cache.layer(1).is_ragged
    assert kept_positions(cache.layer(0), 0, 0) == [2, 5, 9]
    assert kept_positions(cache.layer(0), 0, 1) == [0, 11]
    assert kept_by_layer(cache)[0] == [[2, 5, 9], [0, 11]]
    assert kept_by_layer(cache)[1] == [list(range(12))] * 2
    assert kept_counts(cache) == [[[3, 2]]] + [[[12, 12]]] * 3
    assert kept_total(cache) == 5 + 3 * 2 * 12
    positions = full_layer_positions(cache)
    assert sorted(positions) == [0, 1, 2, 3]
    assert positions[0].tolist() == [[[2, 5, 9], [0, 11, -1]]]  # rectangular form: the short head's slot is empty

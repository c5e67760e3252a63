"""`SharedStorage.joined`: a one-row fork whose own tokens went into its prefix's room reads both as one rectangle."""

from __future__ import annotations

import torch

from kvsqueeze.storage import DenseStorage, SharedStorage
from kvsqueeze.storage.dense import ROOM
from tests.unit.storage.test_dense import context, lent, tokens

ROW = torch.zeros(1, dtype=torch.long)


def test_joined_is_the_prefix_then_the_own_slots_in_place():
    host = context().with_room()
    fork = SharedStorage.over([host], ROW, lent(host))
    assert fork.joined() is not None  # nothing of its own yet: the prefix alone
    for q, start in ((3, 5), (1, 8), (1, 9)):
        fork = fork.append(*tokens(q, start, float(start)))[0]
    joined = fork.joined()
    assert joined is not None
    keys, values = joined
    assert keys.data_ptr() == host.keys.data_ptr()  # views of the host's buffers: no copy
    whole = fork.standalone()
    assert torch.equal(keys, whole.keys) and torch.equal(values, whole.values)
    assert keys.shape[2] == 5 + 5


def test_other_forks_are_not_joined():
    host = context().with_room()
    assert SharedStorage.over([host], ROW).joined() is None  # a suffix of its own
    first = SharedStorage.over([host], ROW, lent(host)).append(*tokens(2, 5, 1.0))[0]
    second = SharedStorage.over([host], ROW).append(*tokens(2, 5, 2.0))[0]  # the room is the first one's
    assert first.joined() is not None and second.joined() is None
    moved = first.append(*tokens(ROOM, 7, 3.0))[0]  # past the room: the suffix leaves it
    assert moved.joined() is None
    assert isinstance(moved.suffix, DenseStorage) and moved.suffix.width() == ROOM + 2

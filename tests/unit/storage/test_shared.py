"""`SharedStorage.joined`: a one-row fork whose own tokens went into its prefix's room reads both as one rectangle."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.storage import DenseStorage, SharedStorage
from kvsqueeze.storage.dense import ROOM
from kvsqueeze.storage.shared import halves, prefix_read
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


@pytest.mark.parametrize("length", [2, 3, 8, 9])
def test_halves_cover_a_segment_once(length):
    """A segment's two halves are views of its buffer holding its first and last ceil(L / 2) slots; with L odd the
    middle slot is in both and hidden from the second half only, so every slot counts once."""
    flat = torch.randn(length + 5, 4)
    keys, values = flat[2 : 2 + length], flat[2 : 2 + length] * 1  # values: a copy, the keys a view of `flat`
    split = halves(keys, values)
    c = (length + 1) // 2
    assert split.keys.shape == split.values.shape == (1, 2, c, 4)
    assert split.keys.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    torch.testing.assert_close(split.keys[0, 0], keys[:c], rtol=0, atol=0)
    torch.testing.assert_close(split.keys[0, 1], keys[length - c :], rtol=0, atol=0)
    torch.testing.assert_close(split.values[0, 1], values[length - c :], rtol=0, atol=0)
    if length % 2 == 0:
        assert split.middle is None
    else:
        assert split.middle is not None and split.middle.shape == (1, 2, 1, c)
        hidden = torch.isinf(split.middle[0, :, 0])
        assert hidden.nonzero().tolist() == [[1, 0]]  # the middle slot, in the second half


def test_a_ragged_prefix_is_read_in_halves_only_when_every_head_has_two_slots():
    """Halves need two slots a head; a head holding fewer leaves the prefix to the products (no halves)."""
    keys = torch.randn(1, 2, 5, 4)
    every = torch.arange(5).expand(1, 2, 5).contiguous()
    for counts, split in (([5, 2], True), ([3, 5], True), ([5, 1], False), ([5, 0], False)):
        dense = DenseStorage(keys, keys.clone(), every.to(torch.int32))
        ragged = dense.prune(every, torch.tensor([counts]), ragged=True)
        read = prefix_read(ragged, None)
        assert read.heads is not None and [k.shape[0] for k, _ in read.heads] == counts
        assert (read.halves is not None) == split
        for n, half in zip(counts, read.halves, strict=True) if read.halves else ():  # odd heads: middle hidden once
            c = (n + 1) // 2
            assert half.keys.shape == (1, 2, c, 4) and (half.middle is None) == (n % 2 == 0)
            if half.middle is not None:
                assert half.middle.shape == (1, 2, 1, c)
                assert torch.isinf(half.middle[0, :, 0]).nonzero().tolist() == [[1, 0]]

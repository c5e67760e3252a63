"""`DenseStorage`'s room after its last slot (`Spare`): made once (`with_room`), lent to one fork at a time, whose
tokens then follow the storage's own in memory, and given back once every storage of that fork is gone."""

from __future__ import annotations

import gc
from types import MappingProxyType

import pytest
import torch

from kvsqueeze.storage import DenseStorage
from kvsqueeze.storage.dense import LEND_MIN, ROOM

H, D = 2, 4


def context(t: int = 5, rows: int = 1, seed: int = 0) -> DenseStorage:
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(t, dtype=torch.int32).expand(rows, H, t)
    return DenseStorage(torch.randn(rows, H, t, D, generator=g), torch.randn(rows, H, t, D, generator=g), positions)


def tokens(q: int, start: int, fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    positions = torch.arange(start, start + q, dtype=torch.int32).expand(1, H, q)
    return torch.full((1, H, q, D), fill), torch.full((1, H, q, D), -fill), positions


def lent(host: DenseStorage) -> DenseStorage:
    own = host.lend_room()
    assert own is not None
    return own


def test_with_room_copies_once_and_keeps_the_content():
    base = context()
    host = base.with_room()
    assert host is not base and host.spare is not None and host.spare.capacity == 5 + ROOM
    assert all(torch.equal(a, b) for a, b in zip(host.view(), base.view(), strict=True))
    assert host.with_room() is host
    assert base.lend_room() is None  # no room made: nothing to lend


def test_a_lent_room_takes_a_forks_tokens_right_after_the_last_slot():
    base = context()
    host = base.with_room()
    own = lent(host)
    assert own.width() == 0
    grown, _ = own.append(*tokens(3, 5, 1.0))  # a question: several tokens at once, in place too
    grown, _ = grown.append(*tokens(1, 8, 2.0))
    assert host.spare is not None
    keys = host.spare.keys
    assert grown.keys.data_ptr() == keys[:, :, 5].data_ptr()  # the fork's first token follows the host's last
    assert torch.equal(keys[:, :, 5:9], grown.keys) and torch.equal(grown.values[0, :, -1], torch.full((H, D), -2.0))
    assert grown.positions[0, 0].tolist() == [5, 6, 7, 8]
    assert all(torch.equal(a, b) for a, b in zip(host.view(), base.view(), strict=True))  # the host is as it was


def test_the_room_goes_to_one_fork_at_a_time_and_comes_back():
    host = context().with_room()
    own = lent(host)
    grown, _ = own.append(*tokens(2, 5, 1.0))
    assert host.lend_room() is None  # lent: a second fork keeps its tokens elsewhere
    del own, grown
    gc.collect()
    assert host.lend_room() is not None  # free again


def test_the_host_copies_while_its_room_is_lent():
    host = context().with_room()
    grown, _ = lent(host).append(*tokens(2, 5, 1.0))
    decoded = host.append(*tokens(1, 5, 7.0))[0]  # the context itself goes on: not into the fork's slots
    assert decoded.spare is not host.spare and decoded.positions[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(grown.keys, torch.ones(1, H, 2, D))  # the fork's tokens are untouched


def test_a_full_room_moves_the_forks_tokens_to_buffers_of_their_own():
    host = context().with_room()
    assert host.spare is not None
    grown, _ = lent(host).append(*tokens(ROOM - 1, 5, 1.0))
    for i in range(3):  # decode steps: the last slot of the room, then beyond it
        grown = grown.append(*tokens(1, 4 + ROOM + i, 2.0 + i))[0]
    assert grown.keys.untyped_storage().data_ptr() != host.spare.keys.untyped_storage().data_ptr()  # its own now
    assert grown.width() == ROOM + 2 and grown.keys[0, 0, -3:, 0].tolist() == [2.0, 3.0, 4.0]
    assert float(grown.keys[0, 0, 0, 0]) == 1.0
    del grown
    gc.collect()
    assert host.lend_room() is not None  # its storages in the room are gone: free again


def test_little_room_is_not_lent():
    host = context().with_room()
    for i in range(ROOM - LEND_MIN + 1):  # the context decodes into its own room
        host = host.append(*tokens(1, 5 + i, 1.0))[0]
    assert host.spare is not None and host.spare.capacity - host.width() == LEND_MIN - 1
    assert host.lend_room() is None


def test_no_room_is_lent_over_several_rows_an_empty_slot_or_a_slot_state():
    assert context(rows=2).with_room().lend_room() is None
    holed = context()
    positions = holed.positions.clone()
    positions[0, 1, 0] = -1
    assert DenseStorage(holed.keys, holed.values, positions).with_room().lend_room() is None
    state = MappingProxyType({"score": torch.zeros(1, H, 5)})
    assert DenseStorage(holed.keys, holed.values, holed.positions, state).with_room().lend_room() is None


def test_buffers_made_in_inference_mode_are_not_written_outside_it():
    with torch.inference_mode():
        host = context().with_room()
    assert host.lend_room() is None  # a fork outside inference mode could not write there
    grown, _ = host.append(*tokens(1, 5, 1.0))  # nor can the host: it copies
    assert grown.spare is not host.spare and float(grown.keys[0, 0, -1, 0]) == 1.0
    with torch.inference_mode():
        own = lent(host)
        assert own.append(*tokens(2, 5, 1.0))[0].width() == 2


def test_a_replaced_fork_storage_lets_go_of_the_room():
    host = context().with_room()
    grown, _ = lent(host).append(*tokens(2, 5, 1.0))
    changed = grown.replace(keys=torch.zeros(1, H, 2, D))
    del grown
    gc.collect()
    assert host.lend_room() is not None  # the replaced storage holds copies, not the room
    assert torch.equal(changed.values, torch.full((1, H, 2, D), -1.0))


def test_a_lent_room_counts_once():
    """The room is the host's memory: counted in its bytes, not again in the fork's."""
    host = context().with_room()
    grown, _ = lent(host).append(*tokens(3, 5, 1.0))
    assert host.nbytes() == 2 * (5 + ROOM) * H * D * 4
    assert grown.nbytes() == 0


@pytest.mark.parametrize("q", [1, 3])
def test_appends_into_free_room_are_in_place(q):
    host = context().with_room()
    grown, view = host.append(*tokens(q, 5, 1.0))
    assert grown.spare is host.spare and view[0].data_ptr() == host.keys.data_ptr()
    assert grown.positions[0, 0].tolist() == list(range(5 + q))

"""Every storage layout keeps the `LayerStorage` promises (storage/base.py), checked against the plain rectangular
view: appends, pruning, row selection, joining rows, pack/unpack, bytes, saving, and immutability (an old storage never
changes, so a snapshot is a reference). A new layout joins LAYOUTS and is tested without editing the tests; a lossy one
(quantized) gives the most its keys and values may differ from what they were given in TOLERANCE."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvsqueeze.quantization import QuantSpec
from kvsqueeze.storage import (
    DenseStorage,
    LayerStorage,
    QuantizedStorage,
    SharedStorage,
    from_tensors,
    storage_bytes,
)

B, H, T, D = 2, 3, 7, 4


def _content(seed: int = 0, t: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values, positions (B, H, t) and the kept counts (B, H) of a layer whose heads keep different amounts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, t + 1, (B, H), generator=g)
    filled = torch.arange(t)[None, None, :] < counts[..., None]
    positions = torch.where(filled, torch.arange(t).expand(B, H, t) * 2 + 1, -1).to(torch.int32)
    keys = torch.randn(B, H, t, D, generator=g) * filled[..., None]
    values = torch.randn(B, H, t, D, generator=g) * filled[..., None]
    return keys, values, positions, counts


def dense(seed: int = 0, t: int = T) -> LayerStorage:
    keys, values, positions, _ = _content(seed, t)
    return DenseStorage(keys, values, positions)


def decoded(seed: int = 0, t: int = T) -> LayerStorage:
    """The dense content with its last two slots appended one at a time, as decode steps append them: a storage whose
    tensors are views of buffers with room after the last slot (`dense.Spare`)."""
    keys, values, positions, _ = _content(seed, t)
    storage: LayerStorage = DenseStorage(keys[:, :, :-2], values[:, :, :-2], positions[..., :-2])
    for i in (t - 2, t - 1):
        storage, _ = storage.append(keys[:, :, i : i + 1], values[:, :, i : i + 1], positions[..., i : i + 1])
    assert isinstance(storage, DenseStorage) and storage.spare is not None
    return storage


def ragged(seed: int = 0, t: int = T) -> LayerStorage:
    keys, values, positions, counts = _content(seed, t)
    every = torch.arange(t).expand(B, H, t)
    return DenseStorage(keys, values, positions).prune(every, counts, ragged=True)


def quantized8(seed: int = 0, t: int = T) -> LayerStorage:  # groups of 3 tokens / 3 channels, newest token exact
    return QuantizedStorage.from_storage(dense(seed, t), QuantSpec(bits=8, group_size=3, residual=1))


def quantized2(seed: int = 0, t: int = T) -> LayerStorage:  # from a ragged layout, every whole group of 2 quantized
    return QuantizedStorage.from_storage(ragged(seed, t), QuantSpec(bits=2, group_size=2, residual=0))


def shared(seed: int = 0, t: int = T, ragged: bool = True) -> LayerStorage:
    """Each row reads its first t - 2 slot columns as a prefix of its own (row 0's dense, row 1's ragged, or dense
    too) and holds the last two itself, appended as a question would be (`storage/shared.py`)."""
    keys, values, positions, _ = _content(seed, t)
    whole = DenseStorage(keys[:, :, :-2], values[:, :, :-2], positions[..., :-2])
    row1 = whole.select_rows(torch.tensor([1]))
    counts = row1.kept()
    every = torch.arange(t - 2).expand(1, H, t - 2)
    prefixes = [whole.select_rows(torch.tensor([0])), row1.prune(every, counts, ragged=True) if ragged else row1]
    storage = SharedStorage.over(prefixes, torch.tensor([0, 1]))
    grown, _ = storage.append(keys[:, :, -2:], values[:, :, -2:], positions[..., -2:])
    return grown


def shared_dense(seed: int = 0, t: int = T) -> LayerStorage:
    """`shared` over two dense prefixes (its standalone copy is dense, not ragged)."""
    return shared(seed, t, ragged=False)


LAYOUTS: dict[str, Callable[..., LayerStorage]] = {
    "dense": dense,
    "dense_decoded": decoded,
    "ragged": ragged,
    "quantized8": quantized8,
    "quantized2": quantized2,
    "shared": shared,
    "shared_dense": shared_dense,
}


def _step(bits: int) -> float:
    """One quantization step over the whole content: no group's scale is larger."""
    keys, values, _, _ = _content()
    both = torch.cat([keys.flatten(), values.flatten()])
    return float(both.max() - both.min()) / (2**bits - 1)


# the most a key or value read back may differ from the one stored: half a step per quantization, and a token pruned
# from a broken group is quantized twice
TOLERANCE = {"quantized8": _step(8), "quantized2": _step(2)}

Held = list[list[list[tuple[int, list[float], list[float]]]]]


def _real(storage: LayerStorage) -> Held:
    """What a storage holds, layout-free: per (row, head), the filled slots' (position, key, value) in slot order."""
    keys, values, positions = storage.view()
    return [
        [
            [
                (int(p), keys[b, h, t].tolist(), values[b, h, t].tolist())
                for t, p in enumerate(positions[b, h])
                if p >= 0
            ]
            for h in range(positions.shape[1])
        ]
        for b in range(positions.shape[0])
    ]


def _positions(held: Held) -> list[list[list[int]]]:
    return [[[p for p, _, _ in seg] for seg in row] for row in held]


def _numbers(held: Held) -> list[float]:
    return [x for row in held for seg in row for _, key, value in seg for x in key + value]


def _close(got: Held, want: Held, tol: float) -> bool:
    """The same positions in every (row, head), keys and values within `tol` (0: equal)."""
    a, b = _numbers(got), _numbers(want)
    slack = tol + 1e-6 if tol else 0.0
    return _positions(got) == _positions(want) and all(abs(x - y) <= slack for x, y in zip(a, b, strict=True))


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request) -> str:
    return request.param


@pytest.fixture
def make(layout) -> Callable[..., LayerStorage]:
    return LAYOUTS[layout]


@pytest.fixture
def tol(layout) -> float:
    return TOLERANCE.get(layout, 0.0)


def test_view_holds_the_content(make, tol):
    keys, values, positions, counts = _content()
    storage = make()
    assert _close(_real(storage), _real(DenseStorage(keys, values, positions)), tol / 2)
    assert torch.equal(storage.kept(), counts)
    assert storage.width() == storage.view()[2].shape[-1]


def test_append_adds_real_tokens_to_every_head_of_their_row(make):
    storage = make()
    before = _real(storage)
    new_pos = torch.tensor([[100, 101], [-1, 100]], dtype=torch.int32)[:, None, :].expand(B, H, 2)
    new_k, new_v = torch.randn(B, H, 2, D), torch.randn(B, H, 2, D)
    grown, step = storage.append(new_k, new_v, new_pos)
    assert torch.equal(step[2][..., -2:], new_pos)  # the step view ends with the q new slots, pads included
    after = _real(grown)
    for b in range(B):
        for h in range(H):
            added = [(int(p), new_k[b, h, i].tolist(), new_v[b, h, i].tolist()) for i, p in enumerate(new_pos[b, h])]
            assert after[b][h] == before[b][h] + [x for x in added if x[0] >= 0]
    assert _real(storage) == before  # immutable: the old storage is a snapshot


def test_one_token_appends_from_one_storage_never_see_each_other(make):
    """Decode steps append one token per row; two appends from the same storage (a snapshot decoded twice) give two
    independent storages, and the first one's token does not show up in the second's or in the original."""
    storage = make()
    before = _real(storage)
    pos = torch.full((B, H, 1), 200, dtype=torch.int32)
    first, _ = storage.append(torch.ones(B, H, 1, D), torch.ones(B, H, 1, D), pos)
    second, _ = storage.append(torch.full((B, H, 1, D), 2.0), torch.full((B, H, 1, D), 2.0), pos)
    third, _ = first.append(torch.full((B, H, 1, D), 3.0), torch.full((B, H, 1, D), 3.0), pos + 1)
    assert _real(storage) == before
    for grown, tail in ((first, [1.0]), (second, [2.0]), (third, [1.0, 3.0])):
        got = _real(grown)
        for b in range(B):
            for h in range(H):
                assert [k[0] for _, k, _ in got[b][h][len(before[b][h]) :]] == tail


def test_prune_keeps_exactly_the_plan(make, tol):
    storage = make()
    positions = storage.view()[2]
    kept = storage.kept()
    counts = (kept + 1) // 2  # uneven across heads
    indices = torch.arange(storage.width()).expand(B, H, -1)[..., : int(counts.max())].contiguous()
    for ragged in (False, True):
        pruned = storage.prune(indices, counts, ragged=ragged)
        want = [[_real(storage)[b][h][: int(counts[b, h])] for h in range(H)] for b in range(B)]
        assert _close(_real(pruned), want, tol)
        assert torch.equal(pruned.kept(), counts)
        assert pruned.nbytes() < storage.nbytes()
    assert torch.equal(storage.view()[2], positions)  # unchanged


def test_select_rows_copies_rows(make):
    storage = make()
    picked = storage.select_rows(torch.tensor([1, 1, 0]))
    rows = _real(storage)
    assert _real(picked) == [rows[1], rows[1], rows[0]]


def test_pack_and_unpack_round_trip(make):
    storage = make()
    keys, _, positions = storage.view()
    assert torch.equal(storage.unpack(storage.pack(positions), -1), positions)
    assert torch.equal(storage.pack(keys), storage.keys)
    with pytest.raises(ValueError, match="does not match"):
        storage.pack(torch.zeros(B + 1, H, storage.width()))


def test_nbytes_stay_the_storages_while_decoding(make):
    """One-token appends (decode steps write into room kept after the last slot, which counts; rows over a shared
    prefix count it once, as worked out when they were made): still the bytes of the distinct tensors' storages."""
    storage = make()
    for i in range(3):
        pos = torch.full((B, H, 1), 300 + i, dtype=torch.int32)
        storage, _ = storage.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), pos)
        assert storage.nbytes() == storage_bytes(storage.kv_tensors(), set()) > 0


def test_nbytes_are_the_storages(make):
    storage = make()
    assert storage.nbytes() == storage_bytes(storage.kv_tensors(), set()) > 0
    if isinstance(storage, SharedStorage):
        alone = storage.standalone()
        if alone.is_ragged:  # over a ragged prefix its copy is ragged: no empty slot stored
            assert alone.padding_slots() == 0 and storage.width() == alone.width()
        else:  # its view pads prefixes to the longest; the stored ones do not
            assert storage.padding_slots() <= int((storage.view()[2] < 0).sum())
        return
    padding = int((storage.view()[2] < 0).sum()) if not storage.is_ragged else 0
    assert storage.padding_slots() == padding


def test_saved_tensors_rebuild_the_same_storage(make):
    storage = make()
    again = from_tensors(storage.to_tensors(), H, D, D)
    saved_as = type(storage.standalone() if isinstance(storage, SharedStorage) else storage)  # shared: standalone
    assert type(again) is saved_as and _real(again) == _real(storage)
    with pytest.raises(ValueError, match="shape"):
        from_tensors(storage.to_tensors(), H + 1, D, D)
    with pytest.raises(ValueError, match="shape"):
        from_tensors(storage.to_tensors(), H, D - 1, D)


def test_settle_keeps_the_tokens(make, tol):
    storage = make()
    grown, _ = storage.append(torch.randn(B, H, 4, D), torch.randn(B, H, 4, D), torch.full((B, H, 4), 90).cumsum(-1))
    settled = grown.settle()
    assert _close(_real(settled), _real(grown), tol / 2)
    assert torch.equal(settled.kept(), grown.kept())
    assert settled.settle() is settled  # nothing left to do


# ---- joining rows (continuous batching) ----------------------------------------------------------------------------


def _new_tokens(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(40, 50, (rows, 1, 1), generator=g).expand(rows, H, 2) + torch.tensor([0, 1])
    return torch.randn(rows, H, 2, D, generator=g), torch.randn(rows, H, 2, D, generator=g), positions.to(torch.int32)


def test_concat_rows_puts_rows_of_different_lengths_side_by_side(make):
    a, b = make(), make(seed=1, t=4)
    joined = a.concat_rows([b, a])
    assert type(joined) is type(a)
    assert _real(joined) == _real(a) + _real(b) + _real(a)  # exactly: no token is moved, padded into or requantized
    assert torch.equal(joined.kept(), torch.cat([a.kept(), b.kept(), a.kept()]))
    assert joined.nbytes() == storage_bytes(joined.kv_tensors(), set())
    assert _real(a.concat_rows([])) == _real(a)


def test_joined_rows_go_on_as_they_would_alone(make):
    a, b = make(), make(seed=1, t=4)
    keys, values, positions = _new_tokens(2 * B, seed=2)
    grown, _ = a.concat_rows([b]).append(keys, values, positions)
    alone_a, _ = a.append(keys[:B], values[:B], positions[:B])
    alone_b, _ = b.append(keys[B:], values[B:], positions[B:])
    assert _real(grown) == _real(alone_a) + _real(alone_b)
    assert _real(grown.settle()) == _real(alone_a.settle()) + _real(alone_b.settle())  # quantized per segment
    assert _real(grown.select_rows(torch.arange(B, 2 * B))) == _real(alone_b)  # rows leave the batch


def test_concat_rows_carries_slot_states(make):
    a, b = make(), make(seed=1, t=4)
    score = a.view()[2].float() + 0.5  # (B, H, T) a state per slot, in the layout of the view
    a = a.replace(slot_state={"score": a.pack(score)})
    joined = a.concat_rows([b])
    state = joined.unpack(joined.slot_state["score"], 0.0)
    filled = joined.view()[2] >= 0
    assert torch.equal(state[:B][filled[:B]], score[score > 0])  # a's rows keep theirs (filled slots, in order)
    assert not bool(state[B:].any())  # b had none: its slots start at 0, as a new token's do


def test_rectangular_rows_join_ragged_ones_in_the_ragged_layout():
    a, b = dense(), ragged(seed=1, t=4)
    for joined, want in ((a.concat_rows([b]), _real(a) + _real(b)), (b.concat_rows([a]), _real(b) + _real(a))):
        assert joined.is_ragged and _real(joined) == want
        assert joined.padding_slots() == 0


def test_dense_join_drops_slot_columns_no_row_fills():
    a, b = dense(), dense(seed=1, t=3)
    joined = a.concat_rows([b])  # b's rows are left-padded to a's width
    assert joined.width() == T and joined.padding_slots() > b.padding_slots()
    alone_b = joined.select_rows(torch.arange(B, 2 * B)).concat_rows([])  # a's rows left: their width goes too
    assert alone_b.width() == b.width() and _real(alone_b) == _real(b)


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (dense, quantized8, "ragged rows cannot join QuantizedStorage"),
        (quantized8, ragged, "join only rows quantized alike, not RaggedStorage"),
        (quantized8, quantized2, "join only rows quantized alike"),
    ],
)
def test_rows_quantized_or_not_do_not_join(first, second, message):
    with pytest.raises(ValueError, match=message):
        first().concat_rows([second()])


def test_rows_of_another_shape_do_not_join(make):
    keys, values, positions, _ = _content()
    other = DenseStorage(keys[:, :2], values[:, :2], positions[:, :2])  # 2 heads instead of 3
    if isinstance(make(), QuantizedStorage):
        other = QuantizedStorage.from_storage(other, make().spec)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"cannot join rows of different heads: \[3, 2\]"):
        make().concat_rows([other])

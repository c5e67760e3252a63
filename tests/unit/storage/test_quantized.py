"""storage/quantized.py: the layout's bytes are exactly the formula's, the newest `residual` tokens stay exact and the
older ones are quantized in whole groups, pruning keeps whole leading groups bit for bit and re-quantizes the rest
within the bound, and rows and heads of different lengths (per-head budgets, padded rows) work."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.quantization import QuantSpec
from kvsqueeze.storage import DenseStorage, QuantizedStorage, storage_bytes


def _tokens(b: int, h: int, t: int, d: int, dv: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, dv, generator=g).to(dtype)
    positions = torch.arange(t, dtype=torch.int32).expand(b, h, t).contiguous()
    return keys, values, positions


def _filled(b: int, h: int, t: int, spec: QuantSpec, d: int = 8, dv: int = 8, seed: int = 0) -> QuantizedStorage:
    keys, values, positions = _tokens(b, h, t, d, dv, seed)
    return QuantizedStorage.from_storage(DenseStorage(keys, values, positions), spec)


def _expected_bytes(spec: QuantSpec, groups: int, residual: int, d: int, dv: int, element: int) -> int:
    """The layout's size from its formula (module docstring): per group of G tokens, packed key codes plus a scale and
    zero point per channel, packed value codes plus a scale and zero point per token and group of G channels."""
    g, bits = spec.group_size, spec.bits
    key_group = g * math.ceil(d * bits / 8) + 2 * d * element
    value_group = g * math.ceil(dv * bits / 8) + 2 * g * math.ceil(dv / g) * element
    return groups * (key_group + value_group) + residual * (d + dv) * element


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("d", "dv", "g"), [(64, 64, 32), (16, 12, 5), (6, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bytes_are_the_layout_formula(bits, d, dv, g, dtype):
    spec = QuantSpec(bits=bits, group_size=g, residual=16)
    keys, values, positions = _tokens(1, 2, 200, d, dv, dtype=dtype)
    stored = QuantizedStorage.from_storage(DenseStorage(keys, values, positions), spec)
    groups = (200 - 16) // g  # per (row, head): whole groups while 16 + g tokens wait
    assert stored.groups.tolist() == [[groups, groups]]
    element = torch.finfo(dtype).bits // 8
    want = 2 * _expected_bytes(spec, groups, 200 - groups * g, d, dv, element)
    assert stored.nbytes() == want == storage_bytes(stored.kv_tensors(), set())


def test_four_bits_in_groups_of_32_hold_an_eighth_plus_the_scales_of_fp32():
    spec = QuantSpec(bits=4, group_size=32, residual=0)
    keys, values, positions = _tokens(1, 1, 320, 64, 64)
    stored = QuantizedStorage.from_storage(DenseStorage(keys, values, positions), spec)
    full = DenseStorage(keys, values, positions).nbytes()
    # codes: 4 of 32 bits; scales and zero points: 2 fp32 for every 32 numbers (keys: per channel over 32 tokens,
    # values: per token over 32 channels), i.e. 2 / 32 of the fp32 size
    assert stored.nbytes() / full == 1 / 8 + 2 / 32 == 0.1875


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    g=st.integers(1, 4),
    residual=st.integers(0, 5),
    pad_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_newest_tokens_stay_exact_and_older_ones_are_grouped(steps, g, residual, pad_row, seed):
    spec = QuantSpec(bits=8, group_size=g, residual=residual)
    gen = torch.Generator().manual_seed(seed)
    stored = QuantizedStorage.empty(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 3), spec)
    added: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[], []]  # per row (every head gets the same)
    at = 0
    for q in steps:
        keys, values = torch.randn(2, 1, q, 4, generator=gen), torch.randn(2, 1, q, 3, generator=gen)
        positions = torch.arange(at, at + q, dtype=torch.int32).expand(2, 1, q).clone()
        if pad_row and at == 0:
            positions[1, 0, : q // 2] = -1  # a left-padded row: pads are not stored
        at += q
        stored, _ = stored.append(keys.expand(2, 2, q, 4), values.expand(2, 2, q, 3), positions.expand(2, 2, q))
        stored = stored.settle()
        for row in (0, 1):
            added[row] += [
                (int(p), keys[row, 0, i], values[row, 0, i]) for i, p in enumerate(positions[row, 0]) if p >= 0
            ]
        waiting = stored.lengths - stored.groups * g  # residual tokens per (row, head)
        assert bool((waiting < residual + g).all()) and bool(((waiting >= residual) | (stored.groups == 0)).all())
    keys, values, positions = stored.view()
    for row in (0, 1):
        n = len(added[row])
        assert positions[row, 0, :n].tolist() == [p for p, _, _ in added[row]]
        for slot, (_, key, value) in enumerate(added[row]):
            if slot >= n - residual:  # the newest `residual`: exact
                assert torch.equal(keys[row, 1, slot], key) and torch.equal(values[row, 1, slot], value)
            else:
                assert torch.allclose(keys[row, 1, slot], key, atol=0.05) and torch.allclose(
                    values[row, 1, slot], value, atol=0.05
                )


def test_append_stores_new_tokens_in_full_precision_until_settled():
    stored = _filled(1, 2, 12, QuantSpec(bits=2, group_size=4, residual=0))
    assert stored.groups.tolist() == [[3, 3]] and stored.residual_keys.shape[0] == 0
    keys, values, positions = _tokens(1, 2, 5, 8, 8, seed=1)
    grown, step = stored.append(keys, values, positions + 100)
    assert torch.equal(step[0][..., -5:, :], keys) and torch.equal(grown.view()[1][..., 12:, :], values)
    assert grown.nbytes() == stored.nbytes() + keys.nbytes + values.nbytes
    settled = grown.settle()
    assert settled.groups.tolist() == [[4, 4]] and settled.residual_keys.shape[0] == 2  # one token per head waits


def test_pruning_keeps_whole_leading_groups_bit_for_bit():
    spec = QuantSpec(bits=4, group_size=3, residual=2)
    stored = _filled(1, 1, 14, spec)  # 4 groups (12 tokens) + 2 exact
    codes = stored.codes.tensors()
    every = torch.arange(14).view(1, 1, 14)
    same = stored.prune(every, torch.tensor([[14]]))
    assert all(torch.equal(codes[n], t) for n, t in same.codes.tensors().items())  # nothing re-quantized
    drop = torch.tensor([[[0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13]]])  # token 5 of group 1 goes
    pruned = stored.prune(drop, torch.tensor([[13]]))
    first = pruned.codes.take(torch.tensor([0])).tensors()
    assert all(torch.equal(codes[n][:1], t) for n, t in first.items())  # group 0 kept its codes
    before, after = stored.view(), pruned.view()
    assert torch.equal(after[2][0, 0], before[2][0, 0, drop[0, 0]])
    step = float(before[0].max() - before[0].min()) / 15
    assert torch.allclose(after[0][0, 0], before[0][0, 0, drop[0, 0]], atol=step / 2 + 1e-6)  # re-quantized
    assert pruned.groups.tolist() == [[3]] and pruned.lengths.tolist() == [[13]]  # 13 = 3 groups + 4 waiting


def test_per_head_budgets_and_later_tokens():
    spec = QuantSpec(bits=8, group_size=2, residual=1)
    stored = _filled(2, 3, 9, spec)
    counts = torch.tensor([[9, 1, 4], [0, 6, 3]])
    indices = torch.stack(
        [torch.randperm(9, generator=torch.Generator().manual_seed(i))[:6].sort().values for i in range(6)]
    )
    indices = torch.cat([indices.view(2, 3, 6), torch.zeros(2, 3, 3, dtype=torch.long)], dim=-1)
    indices[0, 0] = torch.arange(9)
    pruned = stored.prune(indices, counts)
    assert pruned.is_ragged and torch.equal(pruned.kept(), counts) and pruned.width() == 9
    positions = pruned.view()[2]
    for b in range(2):
        for h in range(3):
            n = int(counts[b, h])
            assert positions[b, h, :n].tolist() == indices[b, h, :n].tolist()
            assert bool((positions[b, h, n:] == -1).all())
    grown, _ = pruned.append(
        *_tokens(2, 3, 2, 8, 8, seed=3)[:2],
        torch.full((2, 3, 2), 50, dtype=torch.int32) + torch.arange(2, dtype=torch.int32),
    )
    assert torch.equal(grown.settle().kept(), counts + 2)


def test_replaced_values_and_keys_are_quantized_anew():
    spec = QuantSpec(bits=8, group_size=2, residual=0)
    stored = _filled(1, 1, 6, spec)
    merged = torch.randn(1, 1, 4, 8)
    pruned = stored.prune(torch.tensor([[[0, 1, 2, 3]]]), torch.tensor([[4]]), values=merged)
    step = float(merged.max() - merged.min()) / 255
    assert torch.allclose(pruned.view()[1], merged, atol=step / 2 + 1e-6)
    narrow = stored.replace(keys=stored.keys[:, :5])  # thin keys: 5 channels kept
    assert narrow.view()[0].shape == (1, 1, 6, 5) and torch.allclose(
        narrow.view()[0], stored.view()[0][..., :5], atol=0.02
    )
    with pytest.raises(ValueError, match="do not match the layer's 6 tokens"):
        stored.replace(values=torch.zeros(5, 8))


def test_slot_state_follows_its_tokens():
    stored = _filled(2, 1, 5, QuantSpec(bits=4, group_size=2, residual=1))
    stored = stored.replace(slot_state={"score": stored.pack(torch.arange(10.0).view(2, 1, 5))})
    pruned = stored.prune(torch.tensor([[[1, 3, 4]], [[0, 2, 0]]]), torch.tensor([[3], [2]]))
    assert pruned.unpack(pruned.slot_state["score"], 0.0).tolist() == [[[1.0, 3.0, 4.0]], [[5.0, 7.0, 0.0]]]
    picked = pruned.select_rows(torch.tensor([1, 1, 0]))
    assert picked.unpack(picked.slot_state["score"], 0.0)[:, 0, :2].tolist() == [[5.0, 7.0], [5.0, 7.0], [1.0, 3.0]]
    grown, _ = picked.append(
        torch.zeros(3, 1, 1, 8), torch.zeros(3, 1, 1, 8), torch.full((3, 1, 1), 9, dtype=torch.int32)
    )
    assert grown.unpack(grown.slot_state["score"], -1.0)[:, 0].tolist() == [[5.0, 7.0, 0.0, -1.0]] * 2 + [
        [1.0, 3.0, 4.0, 0.0]
    ]


def test_rows_are_copied_with_their_groups():
    stored = _filled(3, 2, 7, QuantSpec(bits=2, group_size=3, residual=1), seed=4)
    picked = stored.select_rows(torch.tensor([2, 0, 2]))
    keys, values, positions = stored.view()
    got = picked.view()
    assert torch.equal(got[0], keys[[2, 0, 2]]) and torch.equal(got[1], values[[2, 0, 2]])
    assert torch.equal(got[2], positions[[2, 0, 2]]) and picked.nbytes() == stored.nbytes()

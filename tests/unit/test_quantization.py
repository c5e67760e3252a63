"""kvsqueeze.quantization: the round-to-nearest error bound of asymmetric quantization (scale / 2 per number, scale =
(max - min) / (2^bits - 1) of its group), exact packing of 2/4/8-bit codes, KIVI's grouping (keys per channel over G
tokens, values per token over G channels) and the checked spec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.quantization import (
    QuantSpec,
    TokenGroups,
    dequantize,
    pack_codes,
    packed_width,
    quant_spec,
    quantize,
    unpack_codes,
)

bits_st = st.sampled_from([2, 4, 8])


@settings(max_examples=60, deadline=None)
@given(
    bits=bits_st,
    shape=st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 7)),
    dim=st.integers(0, 2),
    spread=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_dequantized_error_is_at_most_half_a_step(bits, shape, dim, spread, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread
    codes, scale, zero = quantize(x, bits, dim, torch.float32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    step = (x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)) / (2**bits - 1)  # the formula
    assert torch.allclose(scale, step, rtol=1e-6, atol=0)
    err = (dequantize(codes, scale, zero) - x).abs()
    assert bool((err <= step / 2 + 1e-6 * spread).all()), float((err - step / 2).max())


def test_the_group_extremes_read_back_exactly_and_a_constant_group_too():
    x = torch.tensor([[-3.0, 0.1, 5.0, 2.2], [7.0, 7.0, 7.0, 7.0]])
    codes, scale, zero = quantize(x, 2, dim=1, dtype=torch.float32)
    assert codes[0].tolist() == [0, 1, 3, 2]  # (0.1 + 3) / (8 / 3) = 1.16 -> 1; (2.2 + 3) / (8 / 3) = 1.95 -> 2
    back = dequantize(codes, scale, zero)
    assert back[0, 0] == -3.0 and back[0, 2] == pytest.approx(5.0)
    assert scale[1].item() == 0.0 and back[1].tolist() == [7.0] * 4


def test_a_16_bit_cache_stores_scales_in_its_dtype():
    x = torch.randn(3, 8).to(torch.bfloat16)
    codes, scale, zero = quantize(x, 4, dim=1, dtype=torch.bfloat16)
    assert scale.dtype == zero.dtype == torch.bfloat16
    step = (x.float().amax(dim=1, keepdim=True) - x.float().amin(dim=1, keepdim=True)) / 15
    err = (dequantize(codes, scale, zero).float() - x.float()).abs()
    assert bool((err <= step / 2 + 0.02 * x.float().abs().amax()).all())  # plus the rounding of scale and zero


@settings(max_examples=80, deadline=None)
@given(bits=bits_st, lead=st.integers(0, 4), n=st.integers(0, 37), seed=st.integers(0, 2**16))
def test_packing_round_trips_exactly(bits, lead, n, seed):
    codes = torch.randint(0, 2**bits, (lead, 3, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (lead, 3, packed_width(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_codes_fill_the_bytes_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]  # the last byte: one code, zero-padded
    assert pack_codes(codes, 4).tolist() == [[1 | 2 << 4, 3, 3]]
    assert [packed_width(64, b) for b in (2, 4, 8)] == [16, 32, 64]


@settings(max_examples=30, deadline=None)
@given(
    bits=bits_st,
    groups=st.integers(1, 4),
    g=st.integers(1, 6),
    d=st.integers(1, 9),
    dv=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_token_groups_quantize_keys_per_channel_and_values_per_token(bits, groups, g, d, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(groups, g, d, generator=gen), torch.randn(groups, g, dv, generator=gen)
    q = TokenGroups.quantize(keys, values, bits)
    k, v = q.dequantize()
    qmax = 2**bits - 1
    key_step = (keys.amax(dim=1, keepdim=True) - keys.amin(dim=1, keepdim=True)) / qmax  # per group and channel
    assert bool(((k.view_as(keys) - keys).abs() <= key_step / 2 + 1e-6).all())
    pad = (-dv) % g  # value channel groups of g channels, the last one short
    padded = torch.cat([values, values[..., -1:].expand(groups, g, pad)], dim=-1).view(groups, g, -1, g)
    value_step = (padded.amax(dim=-1) - padded.amin(dim=-1)) / qmax  # per token and channel group
    per_channel = value_step.repeat_interleave(g, dim=-1)[..., :dv]
    assert bool(((v.view_as(values) - values).abs() <= per_channel / 2 + 1e-6).all())
    assert q.value_scale.shape == (groups, g, -(-dv // g)) and q.key_scale.shape == (groups, d)
    some = torch.tensor([groups * g - 1, 0])
    assert all(torch.equal(a, b[some]) for a, b in zip(q.dequantize(some), (k, v), strict=True))


def test_token_groups_take_and_cat_follow_the_groups():
    q = TokenGroups.quantize(torch.randn(3, 2, 4), torch.randn(3, 2, 4), 4)
    k, _ = q.dequantize()
    swapped = q.take(torch.tensor([2, 0]))
    assert torch.equal(swapped.dequantize()[0], torch.cat([k[4:6], k[0:2]]))
    assert len(q.cat(swapped)) == 5 and torch.equal(q.cat(swapped).dequantize()[0][6:], torch.cat([k[4:6], k[0:2]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, r"kv_bits must be one of 2, 4, 8, got 3"),
        ({"bits": 16}, r"kv_bits must be one of 2, 4, 8, got 16"),
        ({"bits": 4.0}, r"kv_bits must be an integer .*got 4\.0"),
        ({"bits": True}, r"kv_bits must be an integer .*got True"),
        ({"group_size": 0}, r"kv_group_size must be an integer >= 1 .*got 0"),
        ({"residual": -1}, r"kv_residual must be an integer >= 0 .*got -1"),
    ],
)
def test_spec_errors_name_the_argument_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_quant_spec_checks_everything_and_none_means_full_precision():
    assert quant_spec(None) is None
    assert quant_spec(2, 16, 0) == QuantSpec(2, 16, 0)
    with pytest.raises(ValueError, match="kv_group_size"):
        quant_spec(None, kv_group_size=0)

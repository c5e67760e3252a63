"""storage/quantized_file.py: a quantized layer read back from a file comes back the same, and each kind of damage
is refused with a ValueError saying what is wrong."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.quantization import QuantSpec, packed_width
from kvsqueeze.storage import DenseStorage, QuantizedStorage, from_tensors


def _stored() -> QuantizedStorage:
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    positions = torch.arange(9, dtype=torch.int32).expand(2, 2, 9).contiguous()
    return QuantizedStorage.from_storage(
        DenseStorage(keys, values, positions), QuantSpec(bits=4, group_size=3, residual=2)
    )


def _saved() -> dict[str, torch.Tensor]:
    return dict(_stored().to_tensors())


def _set(name: str, value):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[name] = value(t[name]) if callable(value) else value

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("quant", torch.tensor([3, 3, 2])), "kv_bits must be one of 2, 4, 8, got 3"),
        (_set("quant", torch.tensor([4, 0, 2])), "kv_group_size must be an integer >= 1"),
        (_set("key_codes", lambda t: t.to(torch.int32)), "key_codes has dtype torch.int32, expected torch.uint8"),
        (_set("value_codes", lambda t: t[:, :, :-1]), "value_codes has shape"),
        (_set("groups", lambda t: t + 2), "groups must be >= 0 and hold at most lengths tokens"),
        (_set("key_scale", lambda t: -t), "key_scale must be >= 0"),
        (_set("value_zero", lambda t: t * float("nan")), "value_zero holds NaN"),
        (_set("residual_keys", lambda t: t[1:]), "residual_keys has shape"),
        (_set("positions", lambda t: t.flip(0)), "increase strictly"),
        (lambda t: t.pop("residual_values"), r"missing \['residual_values'\]"),
    ],
)
def test_a_saved_layer_is_checked(edit, match):
    tensors = _saved()
    edit(tensors)
    with pytest.raises(ValueError, match=match):
        from_tensors(tensors, 2, 8, 8)


def test_a_saved_layer_comes_back_the_same():
    stored = _stored()
    again = from_tensors(stored.to_tensors(), 2, 8, 8)
    assert isinstance(again, QuantizedStorage) and again.spec == stored.spec
    assert all(torch.equal(a, b) for a, b in zip(again.view(), stored.view(), strict=True))
    assert packed_width(8, 4) == again.codes.key_codes.shape[-1] == 4

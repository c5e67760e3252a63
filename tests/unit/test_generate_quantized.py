"""`generate(..., kv_bits=...)`: eviction then quantization in one cache, the bytes measured from the storages."""

from __future__ import annotations

from typing import Any

import pytest

from kvsqueeze.methods import get_method
from kvsqueeze.pipeline import generate

CONTEXT = "The harbour was quiet in the morning and the old baker sold bread. The code is 4417. " * 12
QUESTION = "What is the code?"
BITS = [2, 4, 8]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantized_generate_holds_fewer_bytes_and_says_how_many_bits(make_model: Any, tokenizer: Any, bits: int):
    model = make_model("llama")
    method = get_method("knorm", ratio=0.5)
    plain = generate(model, tokenizer, CONTEXT, QUESTION, method=method, max_new_tokens=4)
    small = generate(model, tokenizer, CONTEXT, QUESTION, method=method, max_new_tokens=4, kv_bits=bits,
                     kv_group_size=16, kv_residual=16)  # fmt: skip
    assert plain.stats.kv_bits is None and small.stats.kv_bits == bits
    assert small.stats.kv_bytes_before == plain.stats.kv_bytes_before  # the whole context, in the model's dtype
    assert small.stats.tokens_after == plain.stats.tokens_after  # the same tokens kept, fewer bits each
    # codes at `bits` of 32, plus scales/zeros and a 16-token full-precision window: well under the fp32 bytes
    assert small.stats.kv_bytes_after < plain.stats.kv_bytes_after * (bits / 32 + 0.45)
    assert len(small.answers) == 1 and small.finish_reasons


def test_more_bits_hold_more_bytes(make_model: Any, tokenizer: Any):
    model = make_model("llama")
    outs = [
        generate(model, tokenizer, CONTEXT, QUESTION, max_new_tokens=2, kv_bits=b, kv_residual=0) for b in (2, 4, 8)
    ]
    sizes = [out.stats.kv_bytes_after for out in outs]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_bits": 3}, "kv_bits must be one of 2, 4, 8, got 3"),
        ({"kv_bits": 4, "kv_group_size": 0}, "kv_group_size must be an integer >= 1"),
        ({"kv_bits": 4, "kv_residual": -1}, "kv_residual must be an integer >= 0"),
        ({"kv_bits": True}, "kv_bits must be an integer"),
    ],
)
def test_bad_quantization_arguments_are_refused(make_model: Any, tokenizer: Any, kwargs: dict, message: str):
    with pytest.raises(ValueError) as err:
        generate(make_model("llama"), tokenizer, CONTEXT, QUESTION, **kwargs)
    assert str(err.value).startswith(message)

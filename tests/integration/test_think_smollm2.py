"""ThinK on the embedded SmolLM2-135M-Instruct (slow): key bytes shrink exactly, a light channel pruning still answers.

SmolLM2 has head_dim 64: key_channel_ratio 0.5 keeps 32 channels per head, so keys are half as large and the KV
cache 3/4 (values keep all channels).
"""

from __future__ import annotations

from typing import Any

import pytest

import kvsqueeze as kvs
from kvsqueeze.methods.think import ThinK
from tests.integration.test_smollm2 import PREFIX, QUESTION, _context

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any]:
    return kvs.load_model()


def test_half_the_key_channels_is_three_quarters_of_the_bytes(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    out = kvs.generate(model, tokenizer, _context(), [QUESTION], method=ThinK(key_channel_ratio=0.5), max_new_tokens=4)
    s = out.stats
    assert s.kv_bytes_after * 4 == s.kv_bytes_before * 3
    assert s.tokens_after == s.tokens_before
    assert all(layer.keys.shape[-1] == 32 and layer.values.shape[-1] == 64 for layer in out.cache.full_layers())


def test_light_channel_pruning_still_answers_the_needle(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    base = kvs.generate(model, tokenizer, _context(), [QUESTION], max_new_tokens=6, answer_prefix=PREFIX)
    thin = kvs.generate(
        model, tokenizer, _context(), [QUESTION], method=ThinK(key_channel_ratio=0.25), max_new_tokens=6,
        answer_prefix=PREFIX,
    )  # fmt: skip
    assert "5831" in base.answers[0]
    assert "5831" in thin.answers[0]

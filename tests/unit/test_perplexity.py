"""score_tokens: token-by-token scoring equals one forward over the text without compression, equals it under
DecodingCompression whose target exceeds the text, and differs when the target is small."""

from __future__ import annotations

import pytest
import torch

import kvsqueeze as kvs
from kvsqueeze.bench.perplexity import score_tokens
from kvsqueeze.storage.dense import FIRST_ROOM, ROOM
from tests.helpers import ids_of


def reference_nll(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits[prefix - 1 : -1], dim=-1)
    return -logp.gather(-1, ids[0, prefix:, None])[:, 0]


def test_token_by_token_equals_one_forward(make_model):
    model = make_model("llama")
    ids = ids_of(60)
    score = score_tokens(model, ids, None, prefix=5)
    torch.testing.assert_close(score.nll, reference_nll(model, ids, 5), rtol=1e-4, atol=1e-4)
    assert score.perplexity == pytest.approx(float(torch.exp(reference_nll(model, ids, 5).mean())), rel=1e-4)
    # the last token is scored, never fed; decode steps append into room kept after the last slot (storage.dense)
    assert 4 * 59 * 256 <= score.kv_bytes <= 4 * (59 + ROOM) * 256


def test_decoding_compression(make_model):
    model = make_model("llama")
    ids = ids_of(60)
    plain = score_tokens(model, ids, None, prefix=5)
    big = kvs.DecodingCompression(scorer=kvs.get_method("knorm"), target_tokens=100, every=4)
    assert torch.equal(score_tokens(model, ids, big, prefix=5).nll, plain.nll)
    small = kvs.DecodingCompression(scorer=kvs.get_method("streaming_llm"), target_tokens=16, every=4)
    squeezed = score_tokens(model, ids, small, prefix=5)
    assert not torch.allclose(squeezed.nll, plain.nll)
    assert torch.equal(squeezed.nll[: 16 + 4 - 5], plain.nll[: 16 + 4 - 5])  # nothing evicted before 20 tokens
    # at most the target, the tokens of one period and the room decode steps keep after the last slot (storage.dense:
    # FIRST_ROOM, doubled once before the first pruning at 20 tokens)
    assert squeezed.peak_kv_bytes <= 4 * (16 + 4 + 2 * FIRST_ROOM) * 256 < plain.peak_kv_bytes


def test_bad_arguments(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="prefix must be in"):
        score_tokens(model, ids_of(10), None, prefix=10)
    with pytest.raises(ValueError, match="one row"):
        score_tokens(model, ids_of(10)[0], None)

"""Head-adaptive budgets on the embedded SmolLM2-135M (slow): Ada-KV holds the bytes of its plain scorer, stored
ragged, and a batch of two contexts of different lengths holds no padding and answers as each context alone."""

from __future__ import annotations

from typing import Any

import pytest

import kvsqueeze as kvs

pytestmark = pytest.mark.slow

FILLER = "The market square filled slowly as the bakers opened their shutters. Gulls circled over the harbour. "
NEEDLE = "The secret number of the lighthouse keeper is 5831. "
QUESTION = "What is the secret number of the lighthouse keeper?"


@pytest.fixture(scope="module")
def smol() -> tuple[Any, Any]:
    return kvs.load_model()


def test_adakv_holds_the_bytes_of_its_scorer(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    context = FILLER * 8 + NEEDLE + FILLER * 8
    plain = kvs.generate(model, tokenizer, context, QUESTION, method=kvs.get_method("knorm", ratio=0.5),
                         max_new_tokens=4)  # fmt: skip
    ada = kvs.generate(model, tokenizer, context, QUESTION, max_new_tokens=4,
                       method=kvs.get_method("adakv", ratio=0.5, scorer="knorm"))  # fmt: skip
    assert ada.stats.kv_bytes_after == plain.stats.kv_bytes_after
    layers = ada.cache.full_layers()
    assert sum(layer.is_ragged for layer in layers) > len(layers) // 2
    assert any(int(layer.kept.min()) < int(layer.kept.max()) for layer in layers)
    stats = kvs.cache_stats(ada.cache)
    assert stats.metadata_bytes < 0.02 * stats.kv_bytes


def test_padded_batch_holds_no_padding(smol: tuple[Any, Any]) -> None:
    model, tokenizer = smol
    contexts = [FILLER * 10 + NEEDLE, FILLER * 3 + NEEDLE]
    method = kvs.get_method("adakv", ratio=0.5, scorer=kvs.get_method("snapkv", window=16))
    out = kvs.generate(model, tokenizer, contexts, [[QUESTION], [QUESTION]], method=method, max_new_tokens=8)
    assert out.stats.padding_bytes == 0
    alone = [kvs.generate(model, tokenizer, c, QUESTION, method=method, max_new_tokens=8).answers for c in contexts]
    assert out.answers == alone  # ragged rows of a padded batch answer as each context alone

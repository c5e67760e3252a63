"""KVgrad on the embedded SmolLM2-135M: half the cache removed, query-agnostically, and the pass key is still found
(the benchmark's passkey task, 1k tokens); the replay's backward passes leave the model's parameters untouched."""

from __future__ import annotations

import pytest

import kvsqueeze as kvs
from kvsqueeze.bench.tasks import get_task

pytestmark = pytest.mark.slow


def test_half_the_cache_still_finds_the_pass_key():
    model, tokenizer = kvs.load_model()
    flags = [p.requires_grad for p in model.parameters()]
    s = next(iter(get_task("passkey").samples(tokenizer, 1024, 1, 0)))
    out = kvs.generate(model, tokenizer, s.context, list(s.questions), method=kvs.get_method("kvgrad", ratio=0.5),
                       max_new_tokens=s.max_new_tokens, answer_prefix=s.answer_prefix)  # fmt: skip
    assert s.answers[0][0] in out.answers[0], out.answers
    assert out.stats.kv_bytes_after <= out.stats.kv_bytes_before // 2
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())

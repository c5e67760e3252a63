"""KVzip on the embedded SmolLM2-135M: half the cache removed, query-agnostically, and the pass key is still found
(the benchmark's passkey task, 1k tokens). Measured: kvzip and kvzip_plus 4/4 (samples 0-3), SnapKV 1/4."""

from __future__ import annotations

import pytest

import kvsqueeze as kvs
from kvsqueeze.bench.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "indices"), [("kvzip", (0, 2)), ("kvzip_plus", (1,))])
def test_half_the_cache_still_finds_the_pass_key(name, indices):
    model, tokenizer = kvs.load_model()
    samples = list(get_task("passkey").samples(tokenizer, 1024, max(indices) + 1, 0))
    method = kvs.get_method(name, ratio=0.5)
    for i in indices:
        s = samples[i]
        out = kvs.generate(model, tokenizer, s.context, list(s.questions), method=method,
                           max_new_tokens=s.max_new_tokens, answer_prefix=s.answer_prefix)  # fmt: skip
        assert s.answers[0][0] in out.answers[0], (i, out.answers)
        assert out.stats.kv_bytes_after <= out.stats.kv_bytes_before // 2

"""Generated task lengths with the real SmolLM2 tokenizer (slow tier: only the tokenizer is loaded, no model)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from kvsqueeze.bench.tasks import get_task, list_tasks
from kvsqueeze.bench.tasks._common import count_tokens

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from kvsqueeze.loading import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


@pytest.mark.parametrize("name", list_tasks())
@pytest.mark.parametrize("length", [1000, 4000, 8000])
def test_context_within_5_percent_with_the_smollm2_tokenizer(name: str, length: int, smol_tokenizer: Any) -> None:
    start = time.perf_counter()
    samples = get_task(name).samples(smol_tokenizer, length, 2, seed=0)
    seconds = (time.perf_counter() - start) / len(samples)
    for sample in samples:
        n = count_tokens(smol_tokenizer, sample.context)
        assert abs(n - length) <= 0.05 * length, (name, n, length)
        for refs in sample.answers:
            assert any(r in sample.context for r in refs)
    assert seconds < 5.0, f"{name} at {length} tokens took {seconds:.2f} s per sample"  # ~0.1-0.4 s when idle

"""The transformers pipeline on the embedded SmolLM2-135M-Instruct (slow): the module's docstring example runs as
written, and the pipeline answers as kvs.generate does on a real model."""

from __future__ import annotations

import textwrap

import pytest

import kvsqueeze as kvs
from kvsqueeze import hf_pipeline

pytestmark = pytest.mark.slow


def docstring_example() -> str:
    """The example of hf_pipeline's docstring: its lines indented by four spaces (and the blank lines between)."""
    lines = (hf_pipeline.__doc__ or "").splitlines()
    code = [line for line in lines if line.startswith("    ") or not line.strip()]
    return textwrap.dedent("\n".join(code)).strip()


def test_docstring_example_runs_and_answers_as_generate() -> None:
    example = docstring_example()
    assert "kvs.load_model()" in example and "pipe(context" in example
    namespace: dict[str, object] = {}
    exec(compile(example, "hf_pipeline docstring", "exec"), namespace)
    out, outs = namespace["out"], namespace["outs"]
    assert isinstance(out, dict) and isinstance(outs, dict)
    assert isinstance(out["answer"], str) and out["answer"]
    assert out["stats"]["kv_bytes_after"] < 0.6 * out["stats"]["kv_bytes_before"]
    assert len(outs["answers"]) == 2 and all(outs["answers"])
    ref = kvs.generate(
        namespace["model"],
        namespace["tokenizer"],
        namespace["context"],
        ["Who hid the key?", "Where is it?"],
        namespace["snapkv"],
        max_new_tokens=16,
    )
    assert outs["answers"] == ref.answers

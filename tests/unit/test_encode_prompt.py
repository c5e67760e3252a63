"""The prompt encoders the benchmark shares with `generate`: same ids, and the query-aware split."""

from __future__ import annotations

import pytest

from kvsqueeze.pipeline import generate, generate_encoded
from kvsqueeze.prompts import encode_prompt, encode_query_aware, split_prompt

CONTEXT = "The harbour was quiet in the morning. The code is 4417. " * 3
QUESTION = "What is the code?"


@pytest.mark.parametrize("template", [True, False])
def test_encode_prompt_is_the_split_generate_uses(tokenizer, tokenizer_no_template, template: bool) -> None:
    tok = tokenizer if template else tokenizer_no_template
    ids, texts = encode_prompt(tok, CONTEXT, [QUESTION, "Who?"], "It is")
    head, tail = split_prompt(tok, CONTEXT, QUESTION, "It is")
    assert tok.decode(ids) == head and texts[0] == tail and texts[1].startswith("Who?") == template


def test_generate_encoded_answers_like_generate(make_model, tokenizer) -> None:
    model = make_model("llama")
    ids, texts = encode_prompt(tokenizer, CONTEXT, [QUESTION, "Who?"])
    direct = generate(model, tokenizer, CONTEXT, [QUESTION, "Who?"], max_new_tokens=3)
    encoded = generate_encoded(model, tokenizer, [ids], texts, [0, 0], max_new_tokens=3)
    assert encoded.answers == direct.answers
    assert encoded.stats.kv_bytes_after == direct.stats.kv_bytes_after


@pytest.mark.parametrize("template", [True, False])
def test_query_aware_moves_the_question_into_the_compressed_part(tokenizer, tokenizer_no_template, template) -> None:
    tok = tokenizer if template else tokenizer_no_template
    ids, rest = encode_query_aware(tok, CONTEXT, QUESTION, "It is")
    agnostic_ids, [full] = encode_prompt(tok, CONTEXT, [QUESTION], "It is")
    assert tok.decode(ids).endswith(QUESTION) and len(ids) > len(agnostic_ids)
    assert rest.endswith("It is") and QUESTION not in rest
    assert tok.decode(ids) + rest == tok.decode(agnostic_ids) + full  # the same prompt, cut elsewhere

"""Where prompts split: chat before the last user message's content, a context's document where `generate` puts it,
completions after the last blank line (or line break, or before the last word, or the last token)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from kvsqueeze.generation import encode
from kvsqueeze.prompts import encode_prompt, split_prompt
from kvsqueeze.serve.prompts import (
    chat_over_document,
    chat_prompt,
    completion_prompt,
    document_head,
    head_ids,
)

DOC = "The harbour master walked to the market. The code is 4127."


def test_chat_prefix_is_everything_before_the_last_user_content(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [{"role": "system", "content": DOC}, {"role": "user", "content": "What is the code?"}]
    split = chat_prompt(tokenizer, messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert split.question == "What is the code?<|eos|><|assistant|>"
    assert tokenizer.decode(split.prefix_ids) + split.question == rendered
    assert split.prefix_ids + encode(tokenizer, split.question) == encode(tokenizer, rendered)


def test_earlier_turns_are_in_the_prefix(tokenizer: PreTrainedTokenizerFast) -> None:
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    split = chat_prompt(tokenizer, [*turns, {"role": "user", "content": "Bye"}])
    assert tokenizer.decode(split.prefix_ids).endswith("Hello<|eos|><|user|>") and split.question.startswith("Bye")


def test_a_context_question_is_generates_question(tokenizer: PreTrainedTokenizerFast) -> None:
    head = document_head(tokenizer, DOC)
    ids, questions = encode_prompt(tokenizer, DOC, ["What is the code?"])
    assert head_ids(tokenizer, head) == ids
    question = chat_over_document(tokenizer, DOC, head, [{"role": "user", "content": "What is the code?"}])
    assert question == questions[0] == split_prompt(tokenizer, DOC, "What is the code?")[1]


def test_a_system_message_before_a_context_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    head = document_head(tokenizer, DOC)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Code?"}]
    with pytest.raises(ValueError, match="opens the chat"):
        chat_over_document(tokenizer, DOC, head, messages)


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], "messages is empty"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "last message must be"),
    ],
)
def test_chats_that_cannot_split(tokenizer: PreTrainedTokenizerFast, messages: list, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        chat_prompt(tokenizer, messages)


def test_chat_needs_a_template(tokenizer_no_template: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tokenizer_no_template, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize(
    ("prompt", "question"),
    [
        (f"{DOC}\n\nQuestion: What?\nAnswer:", "Question: What?\nAnswer:"),  # after the last blank line
        (f"{DOC}\n\nA\n\nB\n\n", "B\n\n"),  # trailing blank lines stay with the question
        (f"{DOC}\nWhat?", "What?"),  # after the last line break
        ("The harbour master walked", " walked"),  # before the last word
    ],
)
def test_completion_splits(tokenizer: PreTrainedTokenizerFast, prompt: str, question: str) -> None:
    split = completion_prompt(tokenizer, prompt)
    assert split.question == question
    assert tokenizer.decode(split.prefix_ids) + question == prompt


def test_a_single_word_splits_before_its_last_token(tokenizer: PreTrainedTokenizerFast) -> None:
    word = "harbourmaster"
    ids = encode(tokenizer, word, True)
    split = completion_prompt(tokenizer, word)
    assert len(ids) >= 2 and split.prefix_ids == ids[:-1] and split.question == tokenizer.decode(ids[-1:])
    with pytest.raises(ValueError, match="single token"):
        completion_prompt(tokenizer, "a")

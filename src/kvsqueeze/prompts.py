"""Prompts: where the compressed context ends and the question begins.

A prompt is split where the question starts: the context part (the chat template's header and the document) is
prefilled and compressed before any question is seen; the question part (the question, the template's tail and an
answer prefix) continues from the uncompressed length. The query-aware split puts the question into the compressed
part instead.
"""

from __future__ import annotations

import logging
from typing import Any

from kvsqueeze.generation import encode

logger = logging.getLogger("kvsqueeze")
_SENTINEL = "\x00KVSQUEEZE_QUESTION\x00"


def split_prompt(
    tokenizer: Any, context: str, question: str, answer_prefix: str = "", chat_template: bool = True
) -> tuple[str, str]:
    """(context part, question part) of the prompt. Falls back to a plain prompt without a chat template."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{context}\n\n{_SENTINEL}"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, _, tail = rendered.partition(_SENTINEL)
        return head, question + tail + answer_prefix
    if chat_template:
        logger.warning("The tokenizer has no chat template; using a plain 'Question: / Answer:' prompt.")
    prefix = f" {answer_prefix}" if answer_prefix else ""
    return f"{context}\n\n", f"Question: {question}\nAnswer:{prefix}"


def encode_prompt(
    tokenizer: Any, context: str, questions: list[str], answer_prefix: str = "", chat_template: bool = True
) -> tuple[list[int], list[str]]:
    """(context token ids, question texts): the part compressed once, and the text each question continues with."""
    splits = [split_prompt(tokenizer, context, q, answer_prefix, chat_template) for q in questions]
    has_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    return encode(tokenizer, splits[0][0], not has_template), [q for _, q in splits]


def encode_query_aware(
    tokenizer: Any, context: str, question: str, answer_prefix: str = "", chat_template: bool = True
) -> tuple[list[int], str]:
    """The query-aware split: the question goes into the compressed part; the rest of the prompt is decoded after."""
    head, rest = split_prompt(tokenizer, context, question, answer_prefix, chat_template)
    cut = rest.find(question) + len(question)
    if cut >= len(rest):
        raise ValueError("query-aware prompts need text after the question (a chat template or 'Answer:')")
    has_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    return encode(tokenizer, head + rest[:cut], not has_template), rest[cut:]


def question_token_count(
    tokenizer: Any, context: str, question: str, answer_prefix: str = "", chat_template: bool = True
) -> int:
    """How many of the last tokens of `encode_query_aware`'s compressed part are the question (what query-aware
    methods such as FINCH use as their window): its tokens minus those of the prompt before the question."""
    ids, _ = encode_query_aware(tokenizer, context, question, answer_prefix, chat_template)
    head, _ = split_prompt(tokenizer, context, question, answer_prefix, chat_template)
    has_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    return max(1, len(ids) - len(encode(tokenizer, head, not has_template)))

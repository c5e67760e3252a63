"""Where a request's prompt is split: the prefix (prefilled, compressed and cached) and the question (decoded after
it, continuing at the uncompressed positions, as in `kvsqueeze.generate`).

- Chat, automatic: the prefix is the rendered chat up to the content of the last message (a user message), so every
  earlier message (a system message holding a document, earlier turns) is cached; the question is that content and
  what the chat template adds after it.
- Chat over a context (`context_id`): the document opens the first user message, followed by a blank line, exactly
  as `generate` places it; the context's prefix is the chat template's opening and the document.
- Completions, automatic: the prompt is cut after its last blank line (else after its last line break, else before
  its last word, else before its last token); what comes before is the prefix.
- Completions over a context: the prompt continues the context's prefix text as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from kvsqueeze.generation import encode
from kvsqueeze.prompts import split_prompt

_SENTINEL = "\x00KVSQUEEZE_SERVE_QUESTION\x00"


@dataclass(frozen=True)
class Prompt:
    """A prompt split for the cache: the prefix's token ids and the question text that continues it."""

    prefix_ids: list[int]
    question: str


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if not has_template(tokenizer):
        raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except TemplateError as err:
        raise ValueError(f"the model's chat template cannot render these messages: {err}") from None


def check_messages(messages: list[dict[str, str]]) -> None:
    """The last message must be the user's question."""
    if not messages:
        raise ValueError("messages is empty: give at least one user message")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be a user message (the question), got role {messages[-1]['role']!r}")


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> Prompt:
    """The automatic split of a chat: every message before the last user message's content is the prefix."""
    check_messages(messages)
    marked = [*messages[:-1], {**messages[-1], "content": _SENTINEL}]
    head, found, tail = _render(tokenizer, marked).partition(_SENTINEL)
    if not found or _SENTINEL in tail:
        raise ValueError("the model's chat template does not show the last message once as given: cannot split it")
    if not head:
        raise ValueError("the chat template renders nothing before the last message: there is no prefix to cache")
    return Prompt(encode(tokenizer, head), messages[-1]["content"] + tail)


def document_head(tokenizer: Any, document: str) -> str:
    """The prefix text of a context holding `document`: `generate`'s context part (template opening, document)."""
    if not document.strip():
        raise ValueError("the context's text is empty")
    return split_prompt(tokenizer, document, "")[0]


def head_ids(tokenizer: Any, head: str) -> list[int]:
    """The token ids of a document's prefix text, encoded as `generate` encodes it."""
    return encode(tokenizer, head, not has_template(tokenizer))


def chat_over_document(tokenizer: Any, document: str, head: str, messages: list[dict[str, str]]) -> str:
    """The question text of a chat over a context: the rendered chat, the document opening its first user message,
    after the context's prefix `head`."""
    check_messages(messages)
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    placed = [*messages[:first], {**messages[first], "content": f"{document}\n\n{messages[first]['content']}"}]
    rendered = _render(tokenizer, placed + messages[first + 1 :])
    if not rendered.startswith(head):
        raise ValueError(
            "with a context_id, the context's document opens the chat (at the start of the first user message); "
            "these messages put something before it (a system message?): move it into a user message"
        )
    return rendered[len(head) :]


def completion_prompt(tokenizer: Any, prompt: str) -> Prompt:
    """The automatic split of a completion prompt (see the module docstring)."""
    for separator, after in (("\n\n", True), ("\n", True), (" ", False)):
        at = prompt.rstrip(separator).rfind(separator)
        cut = at + len(separator) if after else at
        if at > 0 and 0 < cut < len(prompt) and prompt[:cut].strip():
            return Prompt(encode(tokenizer, prompt[:cut], True), prompt[cut:])
    ids = encode(tokenizer, prompt, True)
    if len(ids) < 2:
        raise ValueError("the prompt is a single token: give at least two (a prefix to cache and a token after it)")
    return Prompt(ids[:-1], str(tokenizer.decode(ids[-1:])))

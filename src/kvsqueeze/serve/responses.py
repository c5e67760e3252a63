"""OpenAI's response bodies and stream chunks, for chat and for completions, and the server-sent events framing.

Responses carry one extension object, `kvsqueeze`: the id of the context the answer was decoded over and where it
was found (`memory`, `disk`, or `miss` when it was prefilled for this request).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <JSON>` (or a literal such as [DONE]) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


@dataclass
class Format:
    """The bodies of one response, chat (`chat=True`) or completion, sharing one id and creation time."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish: str, counts: dict[str, int], context: dict[str, Any]) -> dict[str, Any]:
        """The whole answer, for a request that does not stream."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}  # fmt: skip
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish,
                                                       "logprobs": None}])  # fmt: skip
        return {**body, "usage": counts, "kvsqueeze": context}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        """One stream chunk: new text, or the finish reason (chat: the first chunk carries the role)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "finish_reason": finish,
                                                   "logprobs": None}])  # fmt: skip

    def usage_chunk(self, counts: dict[str, int], context: dict[str, Any]) -> dict[str, Any]:
        """The last chunk when the client asked for `stream_options.include_usage`: no choices, the usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind, []), "usage": counts, "kvsqueeze": context}

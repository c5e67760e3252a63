"""The request bodies the server reads, as pydantic models of OpenAI's API plus kvsqueeze's extension fields
(`kv_compression`, `context_id`). A body that does not fit its model (a missing or unknown field, a wrong type) is a
422; values the server cannot serve are refused later with a 400 naming them.

OpenAI fields the server does not implement are accepted only at their neutral value (`logprobs: false`,
`presence_penalty: 0`, ...), so a client that sends defaults works and one that asks for more is told.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KVCompression(Strict):
    """How the context is compressed (fields left out take the server's --method/--ratio/--option/--budget-policy)."""

    method: str | None = Field(None, description="a registered method (see `kvsqueeze list`), 'none' = off")
    ratio: float | None = Field(None, description="fraction of the context's tokens removed, in [0, 1)")
    options: dict[str, Any] | None = Field(None, description='the method\'s options, e.g. {"window": 16}')
    budget_policy: str | None = Field(None, description="adakv, criticalkv, global or pyramid")
    kv_bits: int | None = Field(None, description="store the kept keys and values in 8, 4 or 2 bits (null: full)")

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class StreamOptions(Strict):
    include_usage: bool | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": accepted, not used

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        """The message as a chat template takes it: text content ("developer" is the newer name of "system")."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class GenerationRequest(Strict):
    """The fields chat and completion requests share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    kv_compression: KVCompression | None = Field(None, description="kvsqueeze: how the context is compressed")
    context_id: str | None = Field(None, description="kvsqueeze: answer over this context (POST /v1/contexts)")

    def unsupported(self) -> dict[str, Any]:
        """The fields set to something the server does not do: {name: value}."""
        neutral = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                   "logit_bias": (None, {})}  # fmt: skip
        return {name: getattr(self, name) for name, ok in neutral.items() if getattr(self, name) not in ok}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        if self.logprobs:
            found["logprobs"] = self.logprobs
        if self.top_logprobs:
            found["top_logprobs"] = self.top_logprobs
        if self.response_format not in (None, {"type": "text"}):
            found["response_format"] = self.response_format
        if self.tools:
            found["tools"] = "(tools)"
        return found


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        neutral = {"logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}
        for name, ok in neutral.items():
            if getattr(self, name) not in ok:
                found[name] = getattr(self, name)
        return found


class ContextRequest(Strict):
    text: str = Field(description="the document, compressed once and reused by requests naming the returned id")
    kv_compression: KVCompression | None = None


def compression_fields(request: GenerationRequest | ContextRequest) -> dict[str, Any] | None:
    return None if request.kv_compression is None else request.kv_compression.given()

"""A request on its way to the model, and the hand-off between the event loop and the model's thread.

The route builds a `Job` (everything checked that can be checked without the model) and awaits its `events`; the
engine, in the scheduler's thread, posts events to it with `post` (through the loop's thread-safe callback, never
touching the asyncio queue from its own thread). A client that leaves sets `cancelled`; its row leaves the running
batch before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from kvsqueeze.generation import FinishReason, Sampling
from kvsqueeze.methods.base import Method
from kvsqueeze.serve.compression import Compression
from kvsqueeze.serve.errors import APIError
from kvsqueeze.serve.store import Found, StoredContext


@dataclass(frozen=True)
class Started:
    """The context is ready and decoding begins (a streaming response can start)."""

    prompt_tokens: int
    context_id: str
    found: Found


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class ContextReady:
    """A context job's result: the context's info and where it was found."""

    context_id: str
    info: dict[str, Any]
    found: Found
    held: bool  # kept in memory (False: larger than --max-cache-bytes)


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Started | Text | Finished | ContextReady | Failed


@dataclass(eq=False)
class Job:
    """One request for the model. Exactly one of `messages` (chat) and `prompt` (completions) is given for a
    generation; neither for a context job (`kind="context"`), which prefills `document` only.

    document: the text of a context (uploaded, or the one `context_id` names); compression/method: how its prefix is
    compressed; max_tokens_given: False when the request left max_tokens out (the engine then fits it to the room left).
    """

    loop: asyncio.AbstractEventLoop
    kind: Literal["generate", "context"]
    compression: Compression
    method: Method | None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    document: str | None = None
    context_id: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens_given: bool = True
    created: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the engine when it prepares the job
    question: str | None = None
    prefix_ids: list[int] | None = None
    prefix_tokens: int = 0  # set by the route for a known context (its token count), else by the engine
    prompt_tokens: int = 0
    first_text: float | None = None
    # set by the running batch: the context found for a job waiting to join it, and where it was found
    context: StoredContext | None = None
    found: Found | None = None

    def post(self, event: Event) -> None:
        """Hand an event to the route awaiting this job (from any thread)."""
        with contextlib.suppress(RuntimeError):  # a closed event loop: the server is shutting down, nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

"""From a checked request body to a `Job`, and from the job's events to the HTTP answer (a JSON body or a stream of
server-sent events). Everything that can be refused without the model is refused here, before the job is queued."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvsqueeze.generation import Sampling
from kvsqueeze.methods.base import Method
from kvsqueeze.serve.compression import Compression, request_compression
from kvsqueeze.serve.errors import APIError
from kvsqueeze.serve.jobs import ContextReady, Event, Failed, Finished, Job, Started, Text
from kvsqueeze.serve.responses import DONE, Format, sse, usage
from kvsqueeze.serve.schemas import ChatRequest, CompletionRequest, GenerationRequest, KVCompression
from kvsqueeze.serve.settings import ServerSettings
from kvsqueeze.serve.store import ContextStore

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat defaults to --max-tokens-limit)
# The library's sampling computes in float32: a temperature this close to 0 overflows the logits divided by it, and a
# top_p below float32's range rounds to 0 (no token left). Both limits mean "the most likely token": served as such.
MAX_STOP = 4  # stop strings per request, as in OpenAI's API
_POLL_SECONDS = 0.25  # how often a request that does not stream checks that its client is still there


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def compression_of(given: KVCompression | None, default: Compression) -> tuple[Compression, Method | None]:
    """The request's compression settings and the method they build; a 400 naming kv_compression when bad."""
    try:
        compression = request_compression(None if given is None else given.given(), default)
        return compression, compression.build()
    except ValueError as err:
        raise APIError(400, str(err), "kv_compression", "invalid_kv_compression") from None


def sampling_of(body: GenerationRequest, settings: ServerSettings, chat: bool) -> tuple[Sampling, bool]:
    """(Sampling, whether max_tokens was given) from the request's fields; a 400 naming the field at fault."""
    unsupported = body.unsupported()
    if unsupported:
        name, value = next(iter(unsupported.items()))
        hint = " (one answer per request)" if name == "n" else ""
        raise APIError(400, f"{name}={value!r} is not supported by this server{hint}", name, "unsupported_parameter")
    given = body.max_completion_tokens if isinstance(body, ChatRequest) else None
    name = "max_completion_tokens" if given is not None else "max_tokens"
    given = given if given is not None else body.max_tokens
    limit = settings.max_tokens_limit
    if given is not None and not 1 <= given <= limit:
        raise APIError(400, f"{name} must be an integer in [1, {limit}] (this server's --max-tokens-limit), got "
                       f"{given}", name)  # fmt: skip
    default = limit if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, limit)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    try:
        return Sampling(given or default, temperature, top_p, stop, body.seed), given is not None
    except ValueError as err:
        param = next((p for p in ("temperature", "top_p", "stop", "seed") if str(err).startswith(p)), None)
        raise APIError(400, str(err), param) from None


def check_model(body: GenerationRequest, settings: ServerSettings) -> None:
    if body.model != settings.model_name:
        raise APIError(404, f"model {body.model!r} does not exist: this server serves {settings.model_name!r} "
                       "(GET /v1/models)", "model", "model_not_found")  # fmt: skip


async def generation_job(
    body: GenerationRequest, settings: ServerSettings, store: ContextStore, default: Compression
) -> Job:
    """The job of a chat or completion request (not yet queued)."""
    chat = isinstance(body, ChatRequest)
    check_model(body, settings)
    sampling, given = sampling_of(body, settings, chat)
    loop = asyncio.get_running_loop()
    messages = [m.plain() for m in body.messages] if isinstance(body, ChatRequest) else None
    prompt = completion_text(body) if isinstance(body, CompletionRequest) else None
    if body.context_id is None:
        compression, method = compression_of(body.kv_compression, default)
        return Job(loop, "generate", compression, method, messages, prompt, sampling=sampling, max_tokens_given=given)
    if body.kv_compression is not None:
        raise APIError(400, "kv_compression cannot go with context_id: the context was compressed when it was "
                       "created (create another context to compress it differently)", "kv_compression")  # fmt: skip
    info = await asyncio.to_thread(store.document, body.context_id)
    if info is None and store.holds(body.context_id):
        raise APIError(400, f"context {body.context_id!r} is the cached prefix of earlier messages, not an uploaded "
                       "document: send those messages again to reuse it, or upload a document with POST "
                       "/v1/contexts and name its id", "context_id")  # fmt: skip
    if info is None:
        raise unknown_context(body.context_id)
    compression, method = compression_of(KVCompression(**info["compression"]), default)
    return Job(loop, "generate", compression, method, messages, prompt, info["document"], body.context_id,
               sampling, given, prefix_tokens=int(info["tokens"]))  # fmt: skip


def completion_text(body: CompletionRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise APIError(400, f"give one prompt per request, got a list of {len(body.prompt)}", "prompt")
    return body.prompt[0]


def unknown_context(cid: str) -> APIError:
    return APIError(404, f"no context with id {cid!r} (create one with POST /v1/contexts)", "context_id",
                    "context_not_found")  # fmt: skip


async def next_event(job: Job, request: Request) -> Event:
    """The job's next event; ClientGone (and the job cancelled) when the client leaves while waiting."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), _POLL_SECONDS)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def answer(job: Job, request: Request, fmt: Format, stream: bool, include_usage: bool) -> Response:
    """Wait for the job to start, then answer: the whole text, or a stream of chunks."""
    try:
        first = await next_event(job, request)
    except ClientGone:
        return Response(status_code=499)
    if isinstance(first, Failed):
        return error_response(first.error)
    assert isinstance(first, Started)
    context = {"context_id": first.context_id, "context_cache": first.found}
    if stream:
        events = stream_events(job, fmt, first, context, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    parts: list[str] = []
    try:
        while not isinstance(event := await next_event(job, request), Finished):
            if isinstance(event, Failed):
                return error_response(event.error)
            if isinstance(event, Text):
                parts.append(event.text)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(fmt.full("".join(parts), event.reason, usage(first.prompt_tokens, event.completion_tokens),
                                 context))  # fmt: skip


async def stream_events(
    job: Job, fmt: Format, first: Started, context: dict[str, Any], include_usage: bool
) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer; the job is cancelled if the stream is closed early."""
    try:
        if fmt.chat:
            yield sse(fmt.chunk(None, role=True))
        while True:
            event = await job.events.get()
            if isinstance(event, Text):
                yield sse(fmt.chunk(event.text))
            elif isinstance(event, Finished):
                yield sse(fmt.chunk(None, event.reason))
                if include_usage:
                    yield sse(fmt.usage_chunk(usage(first.prompt_tokens, event.completion_tokens), context))
                break
            elif isinstance(event, Failed):
                yield sse(event.error.body())
                break
        yield DONE
    finally:
        job.cancel()  # a no-op once the answer is finished; else the engine drops the row at its next step


def context_body(cid: str, info: dict[str, Any], held: bool, found: str | None = None) -> dict[str, Any]:
    """What the contexts routes answer about a context (its document text left out)."""
    body = {"id": cid, "object": "kvsqueeze.context", **{k: v for k, v in info.items() if k != "document"}}
    body["held_in_memory"] = held
    if found is not None:
        body["found"] = found
    return body


async def context_job_answer(job: Job, request: Request) -> Response:
    try:
        event = await next_event(job, request)
    except ClientGone:
        return Response(status_code=499)
    if isinstance(event, Failed):
        return error_response(event.error)
    assert isinstance(event, ContextReady)
    return JSONResponse(context_body(event.context_id, event.info, event.held, event.found))

"""The FastAPI application: OpenAI's routes (`/v1/models`, `/v1/chat/completions`, `/v1/completions`), kvsqueeze's
contexts (`/v1/contexts`), `/health` and `/metrics`, with every error in OpenAI's shape.

`create_app(model, tokenizer, settings)` builds it around a loaded model; the scheduler's worker thread starts and
stops with the application (its lifespan).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from kvsqueeze.serve.compression import Compression
from kvsqueeze.serve.engine import Engine
from kvsqueeze.serve.errors import APIError, error_body, internal_error
from kvsqueeze.serve.jobs import Job
from kvsqueeze.serve.metrics import CONTENT_TYPE, Metrics
from kvsqueeze.serve.middleware import CountRequests, LimitBody, RequireKey
from kvsqueeze.serve.requests import (
    answer,
    compression_of,
    context_body,
    context_job_answer,
    error_response,
    generation_job,
    unknown_context,
)
from kvsqueeze.serve.responses import Format
from kvsqueeze.serve.scheduler import Scheduler
from kvsqueeze.serve.schemas import ChatRequest, CompletionRequest, ContextRequest
from kvsqueeze.serve.settings import ServerSettings
from kvsqueeze.serve.store import ContextStore

logger = logging.getLogger("kvsqueeze")


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of a request that does not fit its schema: the first problem, where it is, and how many."""
    errors = list(err.errors())
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    text = str(first.get("msg", "invalid"))
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', text)}", None
    return f"{param or 'body'}: {text}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        return JSONResponse(error_body(422, message, param, "invalid_request"), status_code=422)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"no route {request.url.path!r} (see /docs for this server's routes)"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    async def crash(request: Request, exc: Exception) -> Response:
        logger.error("an error on the server's side", exc_info=exc)
        return error_response(internal_error())

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


class State:
    """What the routes share: settings, store, metrics, scheduler, the default compression."""

    def __init__(self, model: Any, tokenizer: Any, settings: ServerSettings) -> None:
        self.settings = settings
        self.store = ContextStore(model, settings.max_cache_bytes, settings.cache_dir)
        self.metrics = Metrics(self.store)
        self.engine = Engine(model, tokenizer, self.store, self.metrics, settings)
        self.scheduler = Scheduler(self.engine, self.metrics, settings.max_queue, settings.max_batch)
        self.default = Compression(
            settings.method, settings.ratio, dict(settings.options), settings.budget_policy, settings.kv_bits
        )
        self.default.build()  # a bad server default fails at start, not at the first request


def create_app(model: Any, tokenizer: Any, settings: ServerSettings) -> FastAPI:
    """The server's application around a loaded model and tokenizer."""
    state = State(model, tokenizer, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.scheduler.stop)

    app = FastAPI(title="kvsqueeze", description="OpenAI-compatible server over compressed KV caches",
                  lifespan=lifespan)  # fmt: skip
    app.state.kvsqueeze = state
    install_error_handlers(app)
    add_routes(app, state)
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(RequireKey, key=settings.api_key)
    app.add_middleware(CountRequests, metrics=state.metrics)
    return app


def add_routes(app: FastAPI, state: State) -> None:
    settings, store = state.settings, state.store

    @app.get("/health")
    async def health() -> Response:
        if not state.scheduler.alive:
            return JSONResponse({"status": "down", "reason": "the model's worker thread is not running"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "kvsqueeze"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await generate(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(body, request)

    async def generate(body: ChatRequest | CompletionRequest, request: Request) -> Response:
        job = await generation_job(body, settings, store, state.default)
        state.scheduler.submit(job)
        fmt = Format(settings.model_name, chat=isinstance(body, ChatRequest))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await answer(job, request, fmt, bool(body.stream), include_usage)

    @app.post("/v1/contexts")
    async def create_context(body: ContextRequest, request: Request) -> Response:
        compression, method = compression_of(body.kv_compression, state.default)
        job = Job(asyncio.get_running_loop(), "context", compression, method, document=body.text)
        state.scheduler.submit(job)
        return await context_job_answer(job, request)

    @app.get("/v1/contexts/{context_id}")
    async def get_context(context_id: str) -> Response:
        info = await asyncio.to_thread(store.info, context_id)
        if info is None:
            raise unknown_context(context_id)
        return JSONResponse(context_body(context_id, info, store.holds(context_id)))

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str) -> Response:
        if not await asyncio.to_thread(store.delete, context_id):
            raise unknown_context(context_id)
        return JSONResponse({"id": context_id, "object": "kvsqueeze.context.deleted", "deleted": True})

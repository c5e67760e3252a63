"""ASGI middleware around the routes: the API key, the body size limit and the request counts. Written against the
raw ASGI interface, so streamed responses pass through untouched."""

from __future__ import annotations

import json
import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvsqueeze.serve.errors import error_body
from kvsqueeze.serve.metrics import Metrics

OPEN_PATHS = ("/health",)  # answered without the API key (a load balancer's probe)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/contexts",
          "/openapi.json", "/docs")  # fmt: skip


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with an OpenAI-shaped error, before any route ran."""
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class RequireKey:
    """Every route but /health needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = (header(scope, b"authorization") or "").encode("latin-1")
        if not secrets.compare_digest(given, self.expected):
            what = "a wrong API key" if given else "no API key"
            await send_error(send, 401, f"this server needs an API key: the request has {what} (send the header "
                             "'Authorization: Bearer <key>', as the openai client does with api_key=...)",
                             {"www-authenticate": "Bearer"})  # fmt: skip
            return None
        return await self.app(scope, receive, send)


class LimitBody:
    """A request body larger than `max_bytes` is refused with a 413: at once when its Content-Length says so, else
    as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, self.message())
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self.message())
            return message

        return await self.app(scope, counted, send)


def route_label(path: str) -> str:
    """The route a path belongs to, for metrics labels (context ids collapsed, unknown paths as 'other')."""
    if path.startswith("/v1/contexts/"):
        return "/v1/contexts/{id}"
    return path if path in ROUTES else "other"


class CountRequests:
    """Counts every response by route and status code (`kvsqueeze_requests_total`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = route_label(scope["path"])

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting)

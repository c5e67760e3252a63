"""Errors in the shape of OpenAI's API: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for the
client's mistakes; a bug is a 500 whose body says so without a stack trace (the trace goes to the server's log)."""

from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
         503: "server_overloaded"}  # fmt: skip


class APIError(Exception):
    """An error answered to the client: its status, message and, where one field is at fault, that field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(err: ValueError, param: str | None = None) -> APIError:
    """A 400 from a library ValueError (its message names the value and what is allowed)."""
    return APIError(400, str(err), param)


def internal_error() -> APIError:
    return APIError(500, "internal server error: the request failed on the server's side (see the server's log)")

"""Every error the HTTP server can return, mapped once to OpenAI's error object.

The body is always ``{"error": {"message", "type", "param", "code"}}`` (the shape the official
``openai`` client parses). Typed :class:`~allinone.errors.AllInOneError` s carry their own status;
request-validation failures (malformed JSON, a body that is not an object, a field of the wrong
type or out of range) are the caller's mistake and become 400, never FastAPI's 422; anything
unexpected becomes a 500 with the same object and is logged, and the server keeps serving.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AllInOneError, AuthenticationError, InvalidInputError, ModelLoadingError, OverloadedError

log = logging.getLogger(__name__)


def error_body(message: str, *, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: AllInOneError) -> JSONResponse:
    """The JSON response for a typed error, with ``Retry-After`` (whole seconds) on 503s."""
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body(exc.message, type=exc.error_type, code=exc.code, param=exc.param)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response_for_status(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error object for a plain HTTP status (not one of our typed errors)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(message, type=kind, code=_HTTP_CODES.get(status, "http_error")),
                        status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:  # pragma: no cover - FastAPI always lists at least one
        return "invalid request", None
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})".replace(" ()", ""), None
    if not loc and kind in {"model_attributes_type", "dict_type", "missing"}:
        if isinstance(first.get("input"), (bytes, bytearray)):
            return "the request body must be a JSON object (send Content-Type: application/json)", None
        return "the request body must be a JSON object", None
    # one path style for every error, as the typed errors write it: messages[0].content
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}", (where or None)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from exceptions to OpenAI-style error responses."""

    @app.exception_handler(AllInOneError)
    async def _typed(request: Request, exc: AllInOneError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, (OverloadedError, ModelLoadingError)):
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        # one code for bad input, whichever layer caught it (the schema here, the API's checks there)
        return JSONResponse(error_body(message, type=InvalidInputError.error_type, code=InvalidInputError.code,
                                       param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes (404), wrong methods (405), oversized bodies (413), in the same shape.
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response_for_status(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", type="server_error", code="internal_error"),
                            status_code=500)

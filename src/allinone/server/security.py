"""API keys at every door: one ASGI middleware in front of the whole app.

With ``api_keys`` set, every request needs a key except ``GET /health`` (for load balancers),
``/metrics`` when ``metrics_public`` is set, and the log-in page itself. A key comes either as
``Authorization: Bearer KEY`` (the scheme is matched case-insensitively, RFC 7235 section 2.1)
or, for a browser, as the session cookie the log-in page (``/login``) sets after checking a
key. That covers the API routes, the OpenAPI document and ``/docs``, the web UI's page and every
Gradio endpoint under ``/ui`` (queue, upload, cancel, reset, ...), so no route is open by being
forgotten. Without a key an API client gets the OpenAI error object with 401; a browser asking
for a page is sent to the log-in page.

Keys are compared in constant time (:func:`key_matches`). Browser sessions are random tokens
kept in memory for ``SESSION_SECONDS``; a restart logs browsers out.
"""

from __future__ import annotations

import hmac
import html
import secrets
import threading
import time
from collections.abc import Sequence
from urllib.parse import parse_qs, quote

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import AuthenticationError
from .errors import error_response

COOKIE = "allinone_session"
SESSION_SECONDS = 12 * 3600
LOGIN_PATH = "/login"


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``keys``. Every key is compared (no early exit) with
    :func:`hmac.compare_digest`, so the time taken does not reveal how much of a key matched
    or which key did."""
    given_bytes = given.encode("utf-8", "surrogatepass")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    return found


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (scheme in any case), else None."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Sessions:
    """Browser sessions opened by the log-in page: token -> expiry (monotonic seconds)."""

    def __init__(self, seconds: float = SESSION_SECONDS) -> None:
        self.seconds = seconds
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._tokens = {t: e for t, e in self._tokens.items() if e > now}
            self._tokens[token] = now + self.seconds
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.monotonic()

    def close(self, token: str | None) -> None:
        with self._lock:
            self._tokens.pop(token or "", None)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>allinone · log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:12vh auto;padding:0 1rem}}
input,button{{font-size:1rem;width:100%;padding:.5rem;margin:.3rem 0;box-sizing:border-box}}
.err{{color:#b00}}</style></head><body><h1>allinone</h1>
<p>This server needs an API key.</p>{error}
<form method="post" action="{action}"><input type="hidden" name="next" value="{next}">
<label>API key <input type="password" name="key" autocomplete="current-password" autofocus required></label>
<button type="submit">Log in</button></form></body></html>"""


def _safe_next(value: str) -> str:
    # only a path on this server: never an absolute URL to elsewhere
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


class AuthMiddleware:
    """Require an API key on every request but the open doors (see the module docstring).

    Args:
        keys: the accepted keys (none: the middleware lets everything through).
        metrics_public: ``/metrics`` needs no key.
    """

    def __init__(self, app: ASGIApp, *, keys: Sequence[str], metrics_public: bool = False) -> None:
        self.app = app
        self.keys = list(keys)
        self.metrics_public = metrics_public
        self.sessions = Sessions()

    def _open(self, method: str, path: str) -> bool:
        if path == "/health" and method in ("GET", "HEAD"):
            return True
        return path == "/metrics" and self.metrics_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys:
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if scope["type"] == "http" and path == LOGIN_PATH:
            await self._login(scope, receive, send)
            return
        if self._open(method, path) or self._authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = Headers(scope=scope)
        wants_page = method == "GET" and "text/html" in headers.get("accept", "")
        if wants_page:
            target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
            await RedirectResponse(f"{LOGIN_PATH}?next={quote(target)}", status_code=303)(scope, receive, send)
            return
        missing = not headers.get("authorization")
        message = ("missing API key: send 'Authorization: Bearer YOUR_KEY'" if missing else "invalid API key")
        await error_response(AuthenticationError(message))(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        token = bearer_token(headers.get("authorization", ""))
        if token is not None:
            return key_matches(token, self.keys)
        return self.sessions.valid(_cookie(headers, COOKIE))

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        target = _safe_next((query.get("next") or ["/"])[0])
        if scope.get("method") == "POST":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if len(body) > 16_384:
                    break
                if not message.get("more_body"):
                    break
            form = parse_qs(body.decode("utf-8", "replace"))
            target = _safe_next((form.get("next") or [target])[0])
            if key_matches((form.get("key") or [""])[0], self.keys):
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(COOKIE, self.sessions.open(), max_age=int(self.sessions.seconds),
                                    httponly=True, samesite="strict", path="/")
                await response(scope, receive, send)
                return
            page = _PAGE.format(error='<p class="err">That key is not valid.</p>', action=LOGIN_PATH,
                                next=html.escape(target))
            await HTMLResponse(page, status_code=401)(scope, receive, send)
            return
        page = _PAGE.format(error="", action=LOGIN_PATH, next=html.escape(target))
        await HTMLResponse(page)(scope, receive, send)


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None

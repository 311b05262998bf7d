"""API keys: ``Authorization: Bearer KEY``, checked in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request

from ..errors import AuthenticationError


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``keys``. Every key is compared (no early exit) with
    :func:`hmac.compare_digest`, so the time taken does not reveal how much of a key matched
    or which key did."""
    given_bytes = given.encode("utf-8")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    return found


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: passes when no keys are configured or the bearer token is one of them.

    Raises:
        AuthenticationError: a missing, malformed or unknown key (HTTP 401).
    """
    keys = request.app.state.server.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing API key: send 'Authorization: Bearer YOUR_KEY'")
    if not key_matches(token.strip(), keys):
        raise AuthenticationError("invalid API key")

"""Stored conversations over HTTP: create, read back, delete (``/v1/sessions``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ...sessions import SESSION_ID_PATTERN
from ..deps import blocking, server_state

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


class NewSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="omit for a random id")


@router.post("", status_code=201)
async def create_session(request: Request, body: NewSession | None = None) -> dict[str, Any]:
    """Create an empty session. 400 if the id is taken. Sessions are also created implicitly by
    the first ``analyze``/``chat`` request that names them."""
    store = server_state(request).store
    session = await blocking(store.create, body.session_id if body else None)
    return session.to_dict()


@router.get("/{session_id}")
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    """``{"id", "object": "session", "created_at", "updated_at", "messages": [{"role", "content",
    "created_at", "sentiment"?}]}`` (Unix seconds); 404 if unknown."""
    store = server_state(request).store
    return (await blocking(store.get, session_id)).to_dict()


@router.delete("/{session_id}")
async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
    """Delete a session and its messages; 404 if unknown."""
    store = server_state(request).store
    await blocking(store.delete, session_id)
    return {"id": session_id, "object": "session.deleted", "deleted": True}

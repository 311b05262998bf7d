"""Small helpers the route modules share."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import anyio
from fastapi import Request

from .state import ServerState

T = TypeVar("T")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def blocking(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a blocking call (a model call, an SQLite query) on a worker thread."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


class Slot:
    """One admitted model request; :meth:`release` is idempotent so every exit path may call it."""

    def __init__(self, server: ServerState) -> None:
        server.admission.acquire()
        self._server = server
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._server.admission.release()


@contextlib.asynccontextmanager
async def admitted(server: ServerState) -> AsyncIterator[Slot]:
    """Hold an admission slot for the body of the ``async with`` (503 if none is free)."""
    slot = Slot(server)
    try:
        yield slot
    finally:
        slot.release()

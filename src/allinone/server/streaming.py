"""Reading the engine's reply stream from the event loop, and stopping it when the client leaves.

The engine hands back a blocking iterator of :class:`~allinone.results.ChatChunk`; closing it
cancels generation at the next token. :class:`ChunkStream` steps that iterator on a worker
thread (so the event loop never blocks) and makes sure it is closed exactly once, whatever
ends the request: the last chunk, an error, or the client going away.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

import anyio
from fastapi import Request

from ..errors import CancelledError
from ..results import ChatChunk, ChatResult

#: seconds between two checks that the client is still there, while a chunk is awaited
WATCH_S = 0.25


class ChunkStream:
    """An async view of a blocking chunk iterator.

    Every touch of the iterator (a step or the close) happens under one lock on a worker
    thread: a generator may not be closed while another thread is inside it.
    """

    def __init__(self, chunks: Iterator[ChatChunk]) -> None:
        self._chunks = chunks
        self._lock = threading.Lock()
        self._done = False

    async def next(self) -> ChatChunk | None:
        """The next chunk, or ``None`` after the last one. Errors of the engine propagate."""
        return await anyio.to_thread.run_sync(self._step)

    @contextlib.asynccontextmanager
    async def watching(self, request: Request) -> AsyncIterator[None]:
        """Watch the client (every :data:`WATCH_S` seconds) while the block runs, so a client
        gone during a long prompt is noticed: the reply is cancelled (the engine drops it within
        one prompt slice) and the block ends with :class:`CancelledError`. One watcher for the
        whole block, not one per chunk.

        Raises:
            CancelledError: the client disconnected.
        """
        gone = False

        async def watch() -> None:
            nonlocal gone
            while not await request.is_disconnected():
                await anyio.sleep(WATCH_S)
            gone = True
            self.cancel()

        error: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            try:
                yield
            except Exception as exc:  # raised below: out of the group it is not an ExceptionGroup
                error = exc
            finally:
                group.cancel_scope.cancel()
        if gone:
            raise CancelledError("the client disconnected")
        if error is not None:
            raise error

    def cancel(self) -> None:
        """Stop the reply from any thread, without waiting for a step in progress (a reply
        iterator without ``cancel`` is stopped by :meth:`aclose` only)."""
        cancel = getattr(self._chunks, "cancel", None)
        if cancel is not None:
            cancel()

    async def aclose(self) -> None:
        """Stop generation (idempotent). Shielded so it also runs in a cancelled request."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close)

    def _step(self) -> ChatChunk | None:
        with self._lock:
            if self._done:
                return None
            # next() with a default: StopIteration must not cross into the event loop's future.
            item = next(self._chunks, None)
            if item is None:
                self._done = True
            return item

    def _close(self) -> None:
        with self._lock:
            if not self._done:
                self._done = True
                close = getattr(self._chunks, "close", None)
                if close is not None:
                    close()


async def collect(request: Request, stream: ChunkStream) -> ChatResult:
    """Join a reply stream into one :class:`ChatResult`, checking while it is computed that the
    client is still connected (:meth:`ChunkStream.watching`).

    Raises:
        CancelledError: the client disconnected; generation has been stopped.
        AllInOneError: whatever the engine raised (timeout, invalid input found on the worker).
    """
    chunks: list[ChatChunk] = []
    try:
        async with stream.watching(request):
            while (chunk := await stream.next()) is not None:
                chunks.append(chunk)
    finally:
        await stream.aclose()
    return ChatResult.from_chunks(chunks)

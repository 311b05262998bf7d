"""The engine: one worker thread owns the backend; every surface submits work to its queue.

No two threads ever touch a backend at once. Work is a function of the backend, either
returning a value (``call``) or yielding items (``stream``); streamed items cross to the caller
through a per-request queue, and a caller that stops reading cancels the work at the next item.
The request queue is bounded: when it is full, :class:`OverloadedError` is raised at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .backends.base import Backend
from .errors import AllInOneError, OverloadedError, RequestTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


class _Job:
    __slots__ = ("fn", "stream", "out", "cancelled", "deadline", "enqueued")

    def __init__(self, fn: Callable[[Backend], Any], stream: bool, timeout: float | None) -> None:
        self.fn = fn
        self.stream = stream
        self.out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()
        self.deadline = self.enqueued + timeout if timeout else None


class Engine:
    """Runs backend work on a single worker thread.

    Args:
        backend: the loaded model; owned by the engine from now on.
        max_queue: the most requests waiting at once; more raise ``OverloadedError``.
        timeout: default per-request limit in seconds (queue wait + run); ``None`` = no limit.
    """

    def __init__(self, backend: Backend, *, max_queue: int = 64, timeout: float | None = None) -> None:
        self.backend = backend
        self.timeout = timeout
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name="allinone-engine", daemon=True)
        self._closed = False
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return self._queue.qsize()

    def call(self, fn: Callable[[Backend], T], *, timeout: float | None = None) -> T:
        """Run ``fn(backend)`` on the worker and return its result (or raise its exception)."""
        job = self._submit(fn, stream=False, timeout=timeout)
        wait = job.deadline - time.monotonic() if job.deadline else None
        try:
            kind, value = job.out.get(timeout=max(wait, 0.001) if wait is not None else None)
        except queue.Empty:
            job.cancelled.set()
            raise RequestTimeoutError("the request timed out") from None
        if kind == "error":
            raise value
        return value

    def stream(self, fn: Callable[[Backend], Iterator[T]], *, timeout: float | None = None) -> Iterator[T]:
        """Run the generator ``fn(backend)`` on the worker; yield its items here.

        Closing the returned iterator (or dropping it) cancels the work before its next item.
        """
        job = self._submit(fn, stream=True, timeout=timeout)
        return self._drain(job)

    def _drain(self, job: _Job) -> Iterator[Any]:
        try:
            while True:
                wait = job.deadline - time.monotonic() if job.deadline else None
                try:
                    kind, value = job.out.get(timeout=max(wait, 0.001) if wait is not None else None)
                except queue.Empty:
                    raise RequestTimeoutError("the request timed out") from None
                if kind == "error":
                    raise value
                if value is _DONE:
                    return
                yield value
        finally:
            job.cancelled.set()

    def _submit(self, fn: Callable, *, stream: bool, timeout: float | None) -> _Job:
        if self._closed:
            raise AllInOneError("the engine is closed")
        job = _Job(fn, stream, timeout if timeout is not None else self.timeout)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverloadedError(f"too many requests waiting ({self._queue.maxsize}); retry shortly") from None
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set() or (job.deadline and time.monotonic() > job.deadline):
                continue
            try:
                if not job.stream:
                    job.out.put(("ok", job.fn(self.backend)))
                    continue
                gen = iter(job.fn(self.backend))
                try:
                    for item in gen:
                        job.out.put(("ok", item))
                        if job.cancelled.is_set() or (job.deadline and time.monotonic() > job.deadline):
                            break
                finally:
                    close = getattr(gen, "close", None)
                    if close is not None:
                        close()
                job.out.put(("ok", _DONE))
            except AllInOneError as exc:
                job.out.put(("error", exc))
            except Exception as exc:  # keep serving after any single failure
                log.exception("engine job failed")
                job.out.put(("error", exc))

    def close(self) -> None:
        """Stop the worker after the queued work and free the model."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=30)
        self.backend.close()

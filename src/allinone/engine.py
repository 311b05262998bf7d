"""The engine: one worker thread owns the backend and schedules all work from every surface.

No two threads ever touch a backend at once. Requests wait in one FIFO queue, bounded in
length (:class:`OverloadedError` beyond ``max_queue``), and the worker loop mixes three kinds:

* **score** jobs (classification): every score job waiting is taken together, up to
  ``max_batch``, and computed in one batched forward pass (micro-batching,
  :meth:`Backend.score_batch`);
* **generate** jobs (chat, JSON extraction): up to ``max_active`` replies are decoded together,
  one token each per step (continuous batching, :meth:`Backend.step`); a new reply joins at the
  next step and a finished one leaves, so a long reply never blocks a short request;
* **call** jobs: any other function of the backend, run alone.

Each loop turn admits waiting replies, runs the oldest waiting score batch or call (first come,
first served), then advances every active reply by one token, so all kinds progress in turn.
Results cross to the caller through a per-request queue; a caller that stops reading a stream
(or times out) cancels its reply at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .backends.base import Backend, GenState, SamplingParams, ScoreRequest, TextDelta, TextStreamer
from .errors import AllInOneError, OverloadedError, RequestTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


@dataclass
class Generation:
    """What a generate job computes: made on the worker by the job's ``prepare`` function.

    Attributes:
        prompt_ids: the rendered prompt.
        sampling: decoding parameters (``max_tokens`` already fitted to the context).
        json_schema: constrain the reply to this JSON schema (see :meth:`Backend.start`).
        info: anything the caller wants back with the reply (e.g. whether input was cut).
    """

    prompt_ids: list[int]
    sampling: SamplingParams
    json_schema: dict | None = None
    info: Any = None


class _Job:
    __slots__ = ("kind", "prepare", "finish", "out", "cancelled", "deadline", "enqueued")

    def __init__(self, kind: str, prepare: Callable, finish: Callable | None, timeout: float | None) -> None:
        self.kind = kind  # "call" | "score" | "generate"
        self.prepare = prepare
        self.finish = finish
        self.out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()
        self.deadline = self.enqueued + timeout if timeout else None

    @property
    def dead(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


class _Active:
    """A reply being decoded by the worker."""

    __slots__ = ("job", "state", "streamer")

    def __init__(self, job: _Job, state: GenState, streamer: TextStreamer) -> None:
        self.job, self.state, self.streamer = job, state, streamer


class GenerationStream:
    """The caller's side of a generate job: iterate for :class:`TextDelta` pieces (the last one
    has the finish reason); ``plan`` is the job's :class:`Generation` once the first piece came.
    Closing the iterator (or dropping it) cancels the reply at the next step."""

    def __init__(self, engine: "Engine", job: _Job) -> None:
        self._engine = engine
        self._job = job
        self.plan: Generation | None = None
        self._it = self._drain()

    def __iter__(self) -> Iterator[TextDelta]:
        return self._it

    def __next__(self) -> TextDelta:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _drain(self) -> Iterator[TextDelta]:
        try:
            while True:
                kind, value = self._engine._get(self._job)
                if kind == "plan":
                    self.plan = value
                    continue
                if value is _DONE:
                    return
                yield value
        finally:
            self._job.cancelled.set()


class Engine:
    """Runs backend work on a single worker thread (see the module docstring).

    Args:
        backend: the loaded model; owned by the engine from now on.
        max_queue: the most requests waiting at once; more raise ``OverloadedError``.
        timeout: default per-request limit in seconds (queue wait + run); ``None`` = no limit.
        max_batch: the most classification prompts computed in one batch.
        max_active: the most replies decoded together.
    """

    def __init__(self, backend: Backend, *, max_queue: int = 64, timeout: float | None = None,
                 max_batch: int = 16, max_active: int = 16) -> None:
        self.backend = backend
        self.timeout = timeout
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_active = max_active
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted and not started
        self._closed = False
        #: sizes of the score batches run so far (for metrics and tests): size -> count
        self.batch_sizes: dict[int, int] = {}
        self._worker = threading.Thread(target=self._run, name="allinone-engine", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not counting the ones running)."""
        return self._waiting

    # -- submitting -----------------------------------------------------------------------
    def call(self, fn: Callable[[Backend], T], *, timeout: float | None = None) -> T:
        """Run ``fn(backend)`` alone on the worker and return its result (or raise its exception)."""
        return self._result(self._submit("call", fn, None, timeout))

    def score(self, prepare: Callable[[Backend], tuple[ScoreRequest, Any]],
              finish: Callable[[Backend, list[float], Any], T], *, timeout: float | None = None) -> T:
        """Score label continuations, batched with other score jobs waiting at the same time.

        ``prepare(backend)`` returns ``((prefix ids, continuations), context)``; after the batched
        pass, ``finish(backend, log-probs, context)`` makes the result. Log-probs are relative
        (see :meth:`Backend.score_batch`): compare them only within one request.
        """
        return self._result(self._submit("score", prepare, finish, timeout))

    def generate(self, prepare: Callable[[Backend], Generation], *, timeout: float | None = None) -> GenerationStream:
        """Generate a reply, decoded together with the other active replies.

        ``prepare(backend)`` returns the :class:`Generation` (prompt, sampling, schema).
        """
        return GenerationStream(self, self._submit("generate", prepare, None, timeout))

    def _submit(self, kind: str, prepare: Callable, finish: Callable | None, timeout: float | None) -> _Job:
        if self._closed:
            raise AllInOneError("the engine is closed")
        with self._lock:
            if self._waiting >= self.max_queue:
                raise OverloadedError(f"too many requests waiting ({self.max_queue}); retry shortly")
            self._waiting += 1
        job = _Job(kind, prepare, finish, timeout if timeout is not None else self.timeout)
        self._inbox.put(job)
        return job

    def _get(self, job: _Job) -> tuple[str, Any]:
        wait = job.deadline - time.monotonic() if job.deadline else None
        try:
            kind, value = job.out.get(timeout=max(wait, 0.001) if wait is not None else None)
        except queue.Empty:
            job.cancelled.set()
            raise RequestTimeoutError("the request timed out") from None
        if kind == "error":
            raise value
        return kind, value

    def _result(self, job: _Job) -> Any:
        return self._get(job)[1]

    # -- the worker -----------------------------------------------------------------------
    def _started(self, job: _Job) -> None:
        with self._lock:
            self._waiting -= 1

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not isinstance(exc, AllInOneError):
            log.error("engine job failed", exc_info=exc)
        job.out.put(("error", exc))

    def _run(self) -> None:
        waiting: deque[_Job] = deque()
        active: list[_Active] = []
        closing = False
        while True:
            # Take everything submitted; sleep only when there is nothing to do.
            try:
                block = not waiting and not active and not closing
                while True:
                    job = self._inbox.get(block=block)
                    block = False
                    if job is None:
                        closing = True
                    else:
                        waiting.append(job)
            except queue.Empty:
                pass
            for job in [j for j in waiting if j.dead]:
                waiting.remove(job)
                self._started(job)
            if closing and not waiting and not active:
                return
            self._admit(waiting, active)
            head = next((j for j in waiting if j.kind != "generate"), None)
            if head is not None and head.kind == "score":
                self._score_batch(waiting)
            elif head is not None:
                waiting.remove(head)
                self._started(head)
                self._run_call(head)
            if active:
                self._step(active)

    def _run_call(self, job: _Job) -> None:
        try:
            job.out.put(("ok", job.prepare(self.backend)))
        except Exception as exc:  # keep serving after any single failure
            self._fail(job, exc)

    def _score_batch(self, waiting: deque[_Job]) -> None:
        jobs = [j for j in waiting if j.kind == "score"][: self.max_batch]
        ready: list[tuple[_Job, ScoreRequest, Any]] = []
        for job in jobs:
            waiting.remove(job)
            self._started(job)
            try:
                request, context = job.prepare(self.backend)
                ready.append((job, request, context))
            except Exception as exc:
                self._fail(job, exc)
        # Long prompts together could overflow the KV cache: at most half of it per batch.
        budget = max(1, self.backend.kv.capacity_tokens // 2) if hasattr(self.backend, "kv") else None
        while ready:
            size, total = 0, 0
            while size < len(ready) and (size == 0 or budget is None or total + len(ready[size][1][0]) <= budget):
                total += len(ready[size][1][0])
                size += 1
            batch, ready = ready[:size], ready[size:]
            self._run_score_batch(batch)

    def _run_score_batch(self, batch: list[tuple[_Job, ScoreRequest, Any]]) -> None:
        self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        try:
            scores = self.backend.score_batch([r for _, r, _ in batch], relative=True)
        except Exception as exc:
            for job, _, _ in batch:
                self._fail(job, exc)
            return
        for (job, _, context), logps in zip(batch, scores):
            try:
                job.out.put(("ok", job.finish(self.backend, logps, context)))
            except Exception as exc:
                self._fail(job, exc)

    def _admit(self, waiting: deque[_Job], active: list[_Active]) -> None:
        for job in [j for j in waiting if j.kind == "generate"]:
            if len(active) >= self.max_active:
                return
            waiting.remove(job)
            self._started(job)
            try:
                plan = job.prepare(self.backend)
                state = self.backend.start(plan.prompt_ids, plan.sampling, json_schema=plan.json_schema)
            except Exception as exc:
                self._fail(job, exc)
                continue
            job.out.put(("plan", plan))
            active.append(_Active(job, state, TextStreamer(self.backend, plan.sampling)))

    def _step(self, active: list[_Active]) -> None:
        for a in [a for a in active if a.job.dead]:
            self._retire(a, active)
        if not active:
            return
        try:
            tokens = self.backend.step([a.state for a in active])
        except Exception as exc:
            for a in list(active):
                self._fail(a.job, exc)
                self._retire(a, active, done=False)
            return
        for a, tok in zip(list(active), tokens):
            for delta in a.streamer.push(tok):
                a.job.out.put(("ok", delta))
            if not a.streamer.done and a.state.exhausted:
                a.job.out.put(("ok", a.streamer.close("length")))
            if a.streamer.done:
                self._retire(a, active)

    def _retire(self, a: _Active, active: list[_Active], *, done: bool = True) -> None:
        active.remove(a)
        try:
            self.backend.finish(a.state)
        except Exception:  # pragma: no cover - releasing a cache entry does not fail
            log.exception("releasing a sequence failed")
        if done:
            a.job.out.put(("ok", _DONE))

    def close(self) -> None:
        """Stop the worker after the queued work and free the model."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        self._worker.join(timeout=30)
        self.backend.close()

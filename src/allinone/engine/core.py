"""The engine: one worker thread owns the backend and schedules every job from every surface.

No two threads ever touch a backend at once, and nothing outside the engine holds one: callers
hand in plain jobs (:mod:`.jobs`) and get plain outputs back. Jobs wait in one FIFO queue,
bounded in length (:class:`OverloadedError` beyond ``max_queue``), and the worker loop mixes:

* **score** jobs (classification): every score job waiting is taken together, up to
  ``max_batch``, and computed in one batched forward pass (micro-batching,
  :meth:`Backend.score_batch`), whichever task they come from;
* **encode** jobs (hidden states for learned heads): batched the same way;
* **generate** jobs (chat, JSON extraction): up to ``max_active`` replies are decoded together,
  one token each per step (continuous batching, :meth:`Backend.step`); a new reply joins at the
  next step and a finished one leaves, so a long reply never blocks a short request;
* **tokenize** jobs: run alone.

Each loop turn admits waiting replies, runs the oldest waiting batch (first come, first
served), then advances every active reply by one token, so all kinds progress in turn. Prompts
are rendered and fitted to the context window on the worker (:mod:`.prompts`). Results cross to
the caller through a per-job queue; a caller that stops reading a stream (or times out) cancels
its reply at the next step. Closing the engine lets queued and running work finish for a
grace period, then fails what is left (:class:`ShuttingDownError`) and frees the model only once
the worker has stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.kv_cache import common_prefix_len
from ..errors import (
    AllInOneError,
    CancelledError,
    InvalidInputError,
    OverloadedError,
    RequestTimeoutError,
    ShuttingDownError,
)
from ..types import TextDelta
from .device import DeviceLock
from .jobs import EncodeJob, EncodeOutput, GenerateJob, Job, PromptInfo, ScoreJob, ScoreOutput, TokenizeJob
from .prompts import Fitted, fit_prompt, token_offsets

if TYPE_CHECKING:
    from ..backends.base import Backend, GenState, TextStreamer
    from ..models import ModelSource

log = logging.getLogger(__name__)
_DONE = object()
#: ``timeout=DEFAULT``: the engine's own per-job timeout
DEFAULT: Any = object()
#: after the grace period, how long a closing engine waits for its worker to fail what is left
#: (the worker checks between turns; one turn is at most a classification batch or a prompt slice)
_ABORT_JOIN_S = 60.0


@dataclass(frozen=True)
class ModelInfo:
    """What is loaded: display id, backend, context window, layers and hidden size, and the
    model file's SHA-256 when known (learned task artifacts are tied to it)."""

    model_id: str
    backend: str
    n_ctx: int
    n_layer: int
    hidden_size: int
    sha256: str | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state, for ``/metrics`` and ``/health``.

    Attributes:
        queue_depth: jobs submitted and not started.
        active_replies: replies being decoded now.
        kv_used_tokens / kv_capacity_tokens: token positions held in the KV cache / its budget.
        prompt_tokens / cached_tokens: prompt tokens asked for so far / found in the KV cache.
        batch_sizes: size of the score and encode batches run so far -> how many.
    """

    queue_depth: int = 0
    active_replies: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def prefix_hit_ratio(self) -> float:
        """Share of all prompt tokens so far that came from the KV cache instead of being computed."""
        return self.cached_tokens / max(self.prompt_tokens, 1)

    def __add__(self, other: "EngineStats") -> "EngineStats":
        """The figures of two engines together (a chat model beside the task model)."""
        sizes = dict(self.batch_sizes)
        for size, count in other.batch_sizes.items():
            sizes[size] = sizes.get(size, 0) + count
        return EngineStats(
            self.queue_depth + other.queue_depth, self.active_replies + other.active_replies,
            self.kv_used_tokens + other.kv_used_tokens, self.kv_capacity_tokens + other.kv_capacity_tokens,
            self.prompt_tokens + other.prompt_tokens, self.cached_tokens + other.cached_tokens, sizes)


class _Task:
    __slots__ = ("job", "out", "cancelled", "deadline", "enqueued")

    def __init__(self, job: Job, timeout: float | None) -> None:
        self.job = job
        self.out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.enqueued = time.monotonic()
        self.deadline = self.enqueued + timeout if timeout else None

    @property
    def kind(self) -> str:
        return type(self.job).__name__

    @property
    def dead(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


class _Active:
    """A reply being decoded by the worker."""

    __slots__ = ("task", "state", "streamer")

    def __init__(self, task: _Task, state: "GenState", streamer: "TextStreamer") -> None:
        self.task, self.state, self.streamer = task, state, streamer


class Pending:
    """The caller's side of a score, encode or tokenize job: :meth:`result` waits for it."""

    def __init__(self, engine: "Engine", task: _Task) -> None:
        self._engine = engine
        self._task = task

    def result(self) -> Any:
        """The job's output.

        Raises:
            RequestTimeoutError: the job's timeout passed first (the job is cancelled).
            AllInOneError: whatever the job raised on the worker (e.g. InvalidInputError).
        """
        return self._engine._get(self._task)[1]

    def cancel(self) -> None:
        self._task.cancelled.set()


class GenerationStream:
    """The caller's side of a generate job: iterate for :class:`~allinone.types.TextDelta`
    pieces (the last one has the finish reason); ``info`` is the :class:`PromptInfo` once the
    first piece came. Closing the iterator (or dropping it) cancels the reply at the next step."""

    def __init__(self, engine: "Engine", task: _Task) -> None:
        self._engine = engine
        self._task = task
        self.info: PromptInfo | None = None
        self._it = self._drain()

    def __iter__(self) -> Iterator[TextDelta]:
        return self._it

    def __next__(self) -> TextDelta:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def cancel(self) -> None:
        """Stop the reply at the next step; safe from any thread (a reader waiting on the
        stream then sees it end)."""
        self._task.cancelled.set()

    def _drain(self) -> Iterator[TextDelta]:
        try:
            while True:
                kind, value = self._engine._get(self._task)
                if kind == "info":
                    self.info = value
                    continue
                if value is _DONE:
                    return
                yield value
        finally:
            self._task.cancelled.set()


class ReplyStream:
    """A reply's chunks, made from the engine streams it submits (:meth:`track`: a reply asked
    again starts a second one). :meth:`cancel` stops whichever runs from any thread, also while
    the reader waits inside ``next()`` for a long prompt to be computed (the engine drops the job
    at its next step: within one prompt slice); the iteration then ends. :meth:`close`, from the
    reading thread, ends it too.
    """

    def __init__(self) -> None:
        self._streams: list[GenerationStream] = []
        self._cancelled = False
        self._chunks: Iterator[Any] = iter(())

    def track(self, stream: "GenerationStream") -> "GenerationStream":
        """Count ``stream`` as part of this reply (cancelled at once if the reply is)."""
        self._streams.append(stream)
        if self._cancelled:
            stream.cancel()
        return stream

    def wrap(self, chunks: Iterator[Any]) -> "ReplyStream":
        """Iterate over ``chunks``; returns ``self``."""
        self._chunks = chunks
        return self

    def __iter__(self) -> "ReplyStream":
        return self

    def __next__(self) -> Any:
        return next(self._chunks)

    def cancel(self) -> None:
        self._cancelled = True
        for stream in list(self._streams):
            stream.cancel()

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class GenerateOutput:
    """A finished reply: its text, finish reason, token count and how its prompt was fitted."""

    text: str
    finish_reason: str
    completion_tokens: int
    info: PromptInfo


class Engine:
    """Runs jobs on a single worker thread that owns the backend (see the module docstring).

    Args:
        backend: the loaded model; owned by the engine from now on (use :meth:`load`).
        max_queue: the most jobs waiting at once; more raise ``OverloadedError``.
        timeout: default per-job limit in seconds (queue wait + run); ``None`` = no limit.
        max_batch: the most classification prompts (or encodings) computed in one batch.
        max_active: the most replies decoded together.
        sha256: the model file's SHA-256, when known.
        device: shared with the other engines on this CPU, so that only one of them computes at
            a time (:class:`DeviceLock`); ``None``: this engine computes whenever it has work.
    """

    def __init__(self, backend: "Backend", *, max_queue: int = 64, timeout: float | None = None,
                 max_batch: int = 16, max_active: int = 16, sha256: str | None = None,
                 device: DeviceLock | None = None) -> None:
        self._backend = backend
        self._device = device
        self.timeout = timeout
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_active = max_active
        self.info = ModelInfo(backend.model_id, backend.name, backend.n_ctx, getattr(backend, "n_layer", 0),
                              getattr(backend, "hidden_size", 0), sha256)
        self._inbox: queue.SimpleQueue[list[_Task] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted and not started
        self._closed = False
        self._abort: ShuttingDownError | None = None  # set: fail every job at the worker's next turn
        self._close_lock = threading.Lock()
        self._freed = False
        self._batch_sizes: dict[int, int] = {}
        self._n_active = 0
        self._continuations: dict[str, list[int]] = {}
        self._worker = threading.Thread(target=self._run, name="allinone-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, source: "ModelSource", *, backend: str = "auto", n_ctx: int = 4096, n_threads: int | None = None,
             dtype: str = "float32", cache_dir: Any = None, kv_cache_mb: float = 128, batch_invariant: bool = False,
             **options: Any) -> "Engine":
        """Load ``source`` on a backend (see :func:`allinone.backends.load_backend`) and start the
        engine over it; ``options`` are the other :class:`Engine` arguments.

        Raises:
            BackendUnavailableError: the backend's library is missing or cannot load the model.
        """
        from ..backends import load_backend

        loaded = load_backend(source, backend, n_ctx=n_ctx, n_threads=n_threads, dtype=dtype,
                              cache_dir=cache_dir, kv_cache_mb=kv_cache_mb, batch_invariant=batch_invariant)
        return cls(loaded, sha256=source.sha256, **options)

    # -- submitting -----------------------------------------------------------------------
    def submit(self, job: Job, *, timeout: float | None = DEFAULT) -> "Pending | GenerationStream":
        """Queue ``job``; a :class:`GenerationStream` for a generate job, else a :class:`Pending`."""
        return self.submit_all([job], timeout=timeout)[0]

    def submit_all(self, jobs: Sequence[Job], *, timeout: float | None = DEFAULT) -> list["Pending | GenerationStream"]:
        """Queue several jobs at once, so that the worker sees them together (the score jobs of
        several tasks on one text then share a micro-batch).

        Raises:
            OverloadedError: the queue holds ``max_queue`` jobs already.
        """
        if self._closed:
            raise ShuttingDownError("the model is closed (the server is shutting down)")
        if not jobs:
            return []
        for job in jobs:
            if not isinstance(job, (TokenizeJob, ScoreJob, GenerateJob, EncodeJob)):
                raise TypeError(f"not an engine job: {job!r}")
        if timeout is not DEFAULT and timeout is not None and (
                isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
            raise InvalidInputError(f"timeout must be a number of seconds above 0, or None; got {timeout!r}",
                                    param="timeout")
        with self._lock:
            if self._waiting + len(jobs) > self.max_queue:
                raise OverloadedError(f"too many requests waiting ({self.max_queue}); retry shortly")
            self._waiting += len(jobs)
        limit = self.timeout if timeout is DEFAULT else timeout
        tasks = [_Task(job, limit) for job in jobs]
        self._inbox.put(tasks)
        return [GenerationStream(self, t) if isinstance(t.job, GenerateJob) else Pending(self, t) for t in tasks]

    def run(self, job: Job, *, timeout: float | None = DEFAULT) -> Any:
        """Submit ``job`` and wait for its output (a generate job: its :class:`GenerateOutput`)."""
        handle = self.submit(job, timeout=timeout)
        return collect(handle) if isinstance(handle, GenerationStream) else handle.result()

    def stats(self) -> EngineStats:
        """The engine's figures now (see :class:`EngineStats`)."""
        kv = getattr(self._backend, "kv", None)
        return EngineStats(
            queue_depth=self._waiting, active_replies=self._n_active,
            kv_used_tokens=kv.used_tokens if kv is not None else 0,
            kv_capacity_tokens=kv.capacity_tokens if kv is not None else 0,
            prompt_tokens=kv.prompt_tokens if kv is not None else 0,
            cached_tokens=kv.cached_tokens if kv is not None else 0,
            batch_sizes=dict(self._batch_sizes))

    def _get(self, task: _Task) -> tuple[str, Any]:
        wait = task.deadline - time.monotonic() if task.deadline else None
        try:
            kind, value = task.out.get(timeout=max(wait, 0.001) if wait is not None else None)
        except queue.Empty:
            task.cancelled.set()
            raise RequestTimeoutError("the request timed out") from None
        if kind == "error":
            raise value
        return kind, value

    # -- the worker -----------------------------------------------------------------------
    def _started(self, task: _Task) -> None:
        with self._lock:
            self._waiting -= 1

    def _fail(self, task: _Task, exc: BaseException) -> None:
        if not isinstance(exc, AllInOneError):
            log.error("engine job failed", exc_info=exc)
        task.out.put(("error", exc))

    def _run(self) -> None:
        waiting: deque[_Task] = deque()
        active: list[_Active] = []
        closing = False
        while True:
            # Take everything submitted; sleep only when there is nothing to do.
            try:
                block = not waiting and not active and not closing
                while True:
                    tasks = self._inbox.get(block=block)
                    block = False
                    if tasks is None:
                        closing = True
                    else:
                        waiting.extend(tasks)
            except queue.Empty:
                pass
            for task in [t for t in waiting if t.dead]:
                waiting.remove(task)
                self._started(task)
                self._drop(task)
            if self._abort is not None:
                self._fail_all(waiting, active, self._abort)
            if closing and not waiting and not active:
                return
            if self._device is None:
                self._turn(waiting, active)
            else:
                with self._device:
                    self._turn(waiting, active)
            self._n_active = len(active)

    def _drop(self, task: _Task) -> None:
        """Tell the reader of a job that died before it started how it ends: a cancelled reply
        ends its stream as one cancelled while decoding does (a reader that cancelled before
        reading waited forever when nothing was sent), another cancelled job raises
        :class:`CancelledError`, a job past its deadline :class:`RequestTimeoutError`."""
        if not task.cancelled.is_set():
            task.out.put(("error", RequestTimeoutError("the request timed out")))
        elif isinstance(task.job, GenerateJob):
            task.out.put(("ok", _DONE))
        else:
            task.out.put(("error", CancelledError("the job was cancelled")))

    def _fail_all(self, waiting: deque[_Task], active: list[_Active], exc: AllInOneError) -> None:
        for task in waiting:
            self._started(task)
            self._fail(task, exc)
        waiting.clear()
        for a in list(active):
            self._retire(a, active, done=False)
            a.task.out.put(("error", exc))

    def _turn(self, waiting: deque[_Task], active: list[_Active]) -> None:
        """One loop turn of compute: admit replies, run the oldest batch, step every reply."""
        self._admit(waiting, active)
        head = next((t for t in waiting if not isinstance(t.job, GenerateJob)), None)
        if head is not None:
            self._run_batch(head, waiting)
        if active:
            self._step(active)

    def _run_batch(self, head: _Task, waiting: deque[_Task]) -> None:
        """Run the head job with every waiting job that can share its batch."""
        if isinstance(head.job, TokenizeJob):
            batch = [head]
        else:
            key = _batch_key(head.job)
            batch = [t for t in waiting if _batch_key(t.job) == key][: self.max_batch]
        for task in batch:
            waiting.remove(task)
            self._started(task)
        try:
            if isinstance(head.job, TokenizeJob):
                head.out.put(("ok", self._backend.tokenize(head.job.text)))
            elif isinstance(head.job, ScoreJob):
                self._score(batch)
            else:
                self._encode(batch)
        except Exception as exc:  # keep serving after any single failure
            for task in batch:
                self._fail(task, exc)

    def _continuation_ids(self, text: str) -> list[int]:
        ids = self._continuations.get(text)
        if ids is None:
            ids = self._backend.tokenize(text)
            if len(self._continuations) >= 4096:
                self._continuations.clear()
            self._continuations[text] = ids
        return ids

    def _prepared(self, batch: list[_Task], prepare) -> list[tuple[_Task, Any]]:
        ready = []
        for task in batch:
            try:
                ready.append((task, prepare(task.job)))
            except Exception as exc:
                self._fail(task, exc)
        return ready

    def _in_budget(self, ready: list, ids_of) -> Iterator[list]:
        """``ready`` in groups whose prompts together take at most half of the KV cache (long
        prompts together could overflow it). A prompt's part shared with the first prompt (a
        task's instructions and examples) is counted once: the backend keeps it once."""
        kv = getattr(self._backend, "kv", None)
        budget = max(1, kv.capacity_tokens // 2) if kv is not None else None
        first = ids_of(ready[0]) if ready else []

        def length(item) -> int:
            ids = ids_of(item)
            return len(ids) if item is ready_all[0] else len(ids) - common_prefix_len(first, ids) + 1

        ready_all = list(ready)
        while ready:
            size, total = 0, 0
            while size < len(ready) and (size == 0 or budget is None or total + length(ready[size]) <= budget):
                total += length(ready[size])
                size += 1
            group, ready = ready[:size], ready[size:]
            self._batch_sizes[len(group)] = self._batch_sizes.get(len(group), 0) + 1
            yield group

    def _score(self, batch: list[_Task]) -> None:
        def prepare(job: ScoreJob):
            conts = [self._continuation_ids(c) for c in job.continuations]
            if any(not c for c in conts):
                raise AllInOneError("a continuation has no tokens")
            return fit_prompt(self._backend, job.prompt, reserve=max(map(len, conts)) - 1), conts

        layers = batch[0].job.layers
        for group in self._in_budget(self._prepared(batch, prepare), lambda r: r[1][0].ids):
            try:
                self._cache_fixed([fitted for _, (fitted, _) in group])
                scores, states = self._backend.score_batch_hidden(
                    [(fitted.ids, conts) for _, (fitted, conts) in group], layers, keep=False)
            except Exception as exc:
                for task, _ in group:
                    self._fail(task, exc)
                continue
            for k, ((task, (fitted, _)), logps) in enumerate(zip(group, scores)):
                hidden = states[k] if states is not None else None
                task.out.put(("ok", ScoreOutput(tuple(logps), fitted.info, hidden)))

    def _encode(self, batch: list[_Task]) -> None:
        def prepare(job: EncodeJob) -> tuple[Fitted, list[int], int]:
            fitted = fit_prompt(self._backend, job.prompt, reserve=0)
            if job.pooling == "last":
                return fitted, fitted.ids, len(fitted.ids) - 1
            start, end = fitted.text_span
            if end <= start:
                raise AllInOneError("the text has no tokens")
            return fitted, fitted.ids[:end], start  # later tokens cannot change a causal state

        layers = batch[0].job.layers
        for group in self._in_budget(self._prepared(batch, prepare), lambda r: r[1][1]):
            try:
                self._cache_fixed([fitted for _, (fitted, _, _) in group])
                states = self._backend.encode_batch([(ids, start) for _, (_, ids, start) in group], layers,
                                                    keep=False)
            except Exception as exc:
                for task, _ in group:
                    self._fail(task, exc)
                continue
            for (task, (fitted, _, _)), st in zip(group, states):
                try:
                    task.out.put(("ok", self._encode_output(task.job, fitted, st)))
                except Exception as exc:
                    self._fail(task, exc)

    def _cache_fixed(self, prompts: list[Fitted]) -> None:
        """Cache the part of each prompt that does not depend on its text (a task's instructions
        and examples) as a shared KV entry, and nothing else: a prompt's own text is rarely
        asked for again, and in llama.cpp's unified KV cache every cached cell costs attention
        time in every later step (after 48 tagger prompts kept whole, encoding ran at 63
        instead of 99 tokens/s: docs/engine.md)."""
        if getattr(self._backend, "kv", None) is None:
            return
        for fixed in {tuple(p.ids[: p.fixed]) for p in prompts if p.fixed}:
            self._backend.cache_prefix(fixed)

    def _encode_output(self, job: EncodeJob, fitted: Fitted, states: np.ndarray) -> EncodeOutput:
        if job.pooling == "last":
            return EncodeOutput(states[:, -1].copy(), fitted.info)  # a copy: not a view keeping every token
        if job.pooling == "mean":
            return EncodeOutput(states.mean(axis=1), fitted.info)
        offsets = token_offsets(self._backend, fitted.info.text or "", fitted.text_ids)
        return EncodeOutput(states, fitted.info, offsets, tuple(fitted.text_ids))

    def _admit(self, waiting: deque[_Task], active: list[_Active]) -> None:
        from ..backends.base import TextStreamer

        for task in [t for t in waiting if isinstance(t.job, GenerateJob)]:
            if len(active) >= self.max_active:
                return
            waiting.remove(task)
            self._started(task)
            job: GenerateJob = task.job
            try:
                fitted = fit_prompt(self._backend, job.prompt, reserve=job.sampling.max_tokens, share=True)
                room = self._backend.n_ctx - 1 - len(fitted.ids)
                sampling = job.sampling if job.sampling.max_tokens <= room else job.sampling.updated(
                    max_tokens=room, min_tokens=min(job.sampling.min_tokens, room))
                conversation = fitted.fixed is None
                if not conversation:
                    self._cache_fixed([fitted])
                written = self._backend.tokenize(job.prompt.reply_prefix) if job.prompt.reply_prefix else []
                # a conversation stays cached for its next turn; a task's reply to one text does
                # not; a reply of written words only computes nothing
                state = None if job.written_only else self._backend.start(
                    fitted.ids, sampling, json_schema=job.json_schema, keep=conversation, written=len(written))
            except Exception as exc:
                self._fail(task, exc)
                continue
            task.out.put(("info", fitted.info))
            streamer = TextStreamer(self._backend, sampling)
            # words already written (``reply_prefix``) are the reply's first tokens: counted,
            # under max_tokens and stop strings like any sampled token
            for tok in written:
                for delta in streamer.push(tok):
                    task.out.put(("ok", delta))
            if state is None:  # written_only: the words are the whole reply
                if not streamer.done:
                    task.out.put(("ok", streamer.close("stop")))
                task.out.put(("ok", _DONE))
                continue
            a = _Active(task, state, streamer)
            active.append(a)
            if streamer.done:
                self._retire(a, active)

    def _step(self, active: list[_Active]) -> None:
        for a in [a for a in active if a.task.dead]:
            # a reader behind its stream still has pieces queued: past the deadline it must
            # learn why the stream ends (not see a clean end without a finish reason)
            timed_out = not a.task.cancelled.is_set()
            self._retire(a, active, done=not timed_out)
            if timed_out:
                a.task.out.put(("error", RequestTimeoutError("the request timed out")))
        if not active:
            return
        try:
            tokens = self._backend.step([a.state for a in active])
        except Exception as exc:
            for a in list(active):
                self._fail(a.task, exc)
                self._retire(a, active, done=False)
            return
        for a, tok in zip(list(active), tokens):
            if tok is None:  # its prompt is still being computed
                continue
            for delta in a.streamer.push(tok):
                a.task.out.put(("ok", delta))
            if not a.streamer.done and a.state.exhausted:
                a.task.out.put(("ok", a.streamer.close("length")))
            if a.streamer.done:
                self._retire(a, active)

    def _retire(self, a: _Active, active: list[_Active], *, done: bool = True) -> None:
        active.remove(a)
        try:
            self._backend.finish(a.state, then=self._turn_closing(a) if done else ())
        except Exception:  # pragma: no cover - releasing a cache entry does not fail
            log.exception("releasing a sequence failed")
        # after the turn's closing: a caller that ends its process once the reply is read
        # (the CLI) must not leave the worker inside llama_decode (a fresh user's probe saw
        # `allinone analyze` exit with a segfault 3 times in 62 when this came first)
        if done:
            a.task.out.put(("ok", _DONE))

    def _turn_closing(self, a: _Active) -> list[int]:
        """What the next turn of a kept conversation will hold after this reply and is not
        cached yet: the template's turn closing (``<|im_end|>\\n<|im_start|>user\\n``), after
        the reply's last sampled token when that one is text. Computed now, while the user
        reads, the next turn's first token does not wait for them (5 of the 23 tokens a short
        chat turn computed; with 1.5 s between turns, turns 2-10 started 14-36 ms sooner in
        three paired runs, docs/benchmarks.md). ``[]`` when the reply's text is not its tokens (a stop string cut it, a
        character was cut in half) or it was not kept."""
        streamer, state = a.streamer, a.state
        if not state.keep or len(state.pending) != 1 or streamer.text.endswith("\ufffd"):
            return []
        ended = state.pending[0] in self._backend.eos_token_ids
        if not (streamer.finish_reason == "stop" and ended
                or streamer.finish_reason == "length" and len(streamer.ids) >= streamer.sampling.max_tokens):
            return []
        closing = self._backend.turn_closing_ids()
        return closing if ended else [*state.pending, *closing] if closing else []

    def close(self, grace: float = 30.0) -> None:
        """Stop the worker (see :meth:`stop`) and free the model; idempotent and safe from any
        thread. The model is never freed while the worker still computes (a backend freed
        under a running ``llama_decode`` crashes the process): if the worker has not stopped,
        the model is left to the process's exit and a warning is logged."""
        with self._close_lock:
            if self._freed:
                return
            self.stop(grace)
            if self._worker.is_alive():
                log.warning("the engine's worker did not stop; the model is left loaded until the process exits")
                return
            self._freed = True
            self._backend.close()

    def stop(self, grace: float = 30.0) -> None:
        """Take no more jobs (:class:`ShuttingDownError`), let the queued and running ones finish
        for up to ``grace`` seconds, then fail what is left with :class:`ShuttingDownError` at the
        worker's next turn: within one prompt slice or decode step, or one classification
        batch. Leaves the backend loaded (for a backend the caller shares, as tests do).

        Args:
            grace: seconds the queued and running work may take; 0 fails it at once.
        """
        self._closed = True
        self._inbox.put(None)
        self._worker.join(timeout=max(grace, 0.0))
        if self._worker.is_alive():
            self._abort = ShuttingDownError()
            self._worker.join(timeout=_ABORT_JOIN_S)
        if not self._worker.is_alive():
            # jobs a caller put in while the worker was stopping: nobody else will answer them
            while True:
                try:
                    tasks = self._inbox.get_nowait()
                except queue.Empty:
                    break
                for task in tasks or ():
                    self._fail(task, ShuttingDownError())


def _batch_key(job: Job) -> tuple:
    if isinstance(job, ScoreJob):
        return ("score", job.layers)
    if isinstance(job, EncodeJob):
        return ("encode", job.layers)
    return (type(job).__name__,)


def collect(stream: GenerationStream) -> GenerateOutput:
    """Read a reply stream to its end."""
    parts: list[str] = []
    last: TextDelta | None = None
    try:
        for delta in stream:
            parts.append(delta.text)
            last = delta
    finally:
        stream.close()
    if last is None or last.finish_reason is None or stream.info is None:  # pragma: no cover - always ends so
        raise AllInOneError("the reply stream ended without a finish reason")
    return GenerateOutput("".join(parts), last.finish_reason, last.completion_tokens, stream.info)

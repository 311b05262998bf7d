"""The Python API: ``AllInOne`` loads one model once and serves every task from it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .backends import SamplingParams, load_backend
from .engine import Engine
from .errors import InvalidInputError
from .models import resolve_model
from .results import AnalyzeResult, ChatChunk, ChatResult, ClassifyResult, TaskResult, Usage
from .settings import Settings
from .tasks import (ChatRequest, ClassifyTask, TaskRegistry, TaskSpec, chat_chunks, classify, classify_request,
                    classify_result, extract, extract_result, plan_chat, plan_extract)
from .tasks.runner import Request, build_request, compile_classify, compile_extract

_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "repetition_penalty"}


class AllInOne:
    """One model, many tasks.

    Build it with :meth:`load`; it is safe to share between threads (all model work runs on
    the engine's single worker thread). Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, engine: Engine, settings: Settings, *, load_seconds: float = 0.0) -> None:
        self.engine = engine
        self.settings = settings
        self.load_seconds = load_seconds
        #: every task this instance serves: the built-ins, ``settings.tasks_dir``, and
        #: whatever :meth:`register_task` adds
        self.tasks = TaskRegistry(tasks_dir=settings.tasks_dir)
        self._compiled: dict[tuple, tuple[TaskSpec, Any]] = {}

    @classmethod
    def load(cls, model: str = "embedded", backend: str = "auto", **options: Any) -> "AllInOne":
        """Resolve, verify and load a model.

        Args:
            model: "embedded" (default), "embedded-1.5b", a .gguf path, an HF folder or a Hub id.
            backend: "auto", "llamacpp" or "transformers".
            **options: any other :class:`Settings` field (e.g. ``n_ctx=2048``).

        Raises:
            ModelSourceError: the model cannot be found or fails its checksum.
            BackendUnavailableError: the backend's library is missing or cannot load the model.
            pydantic.ValidationError: an unknown or invalid option.
        """
        settings = Settings(model=model, backend=backend, **options)
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> "AllInOne":
        start = time.perf_counter()
        source = resolve_model(settings.model, cache_dir=settings.cache_dir)
        backend = load_backend(
            source, settings.backend, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
            dtype=settings.dtype, cache_dir=settings.cache_dir, kv_cache_mb=settings.kv_cache_mb,
        )
        engine = Engine(backend, max_queue=settings.max_queue, timeout=settings.request_timeout,
                        max_batch=settings.max_batch, max_active=settings.max_active)
        return cls(engine, settings, load_seconds=time.perf_counter() - start)

    # -- info ---------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.engine.backend.model_id

    @property
    def backend_name(self) -> str:
        return self.engine.backend.name

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text (control-token strings are not parsed)."""
        self._check_text(text)
        return self.engine.call(lambda b: b.tokenize(text))

    # -- tasks --------------------------------------------------------------------------
    def classify(self, task: ClassifyTask, text: str) -> ClassifyResult:
        """Label ``text`` with ``task`` by label scoring.

        Raises:
            InvalidInputError: empty / whitespace-only / over-long text (no model call is made).
        """
        self._check_text(text)
        return self._classify(task, text)

    def _classify(self, task: ClassifyTask, text: str) -> ClassifyResult:
        budget = self.settings.max_input_tokens
        return self.engine.score(
            lambda b: classify_request(b, task, text, max_input_tokens=budget),
            lambda b, logps, truncated: classify_result(b, task, logps, truncated),
        )

    def sentiment(self, text: str) -> ClassifyResult:
        """``positive`` or ``negative`` with probabilities; English or Chinese text.

        The same as ``run("sentiment", text)``. Text over ``max_input_tokens`` tokens (default
        1024) is cut to that budget, keeping its start, and the result has ``truncated=True``.
        """
        return self.run("sentiment", text)

    def register_task(self, spec: TaskSpec | Mapping[str, Any] | str | Path) -> TaskSpec:
        """Add or replace a task: a :class:`TaskSpec`, a mapping of its fields, or a .toml path.

        Raises:
            TaskDeclarationError: the declaration is invalid (the message names the field).
        """
        return self.tasks.register(spec)

    def run(self, task: str, text: str, *, stream: bool = False, **params: Any) -> TaskResult | Iterator[ChatChunk]:
        """Run any task on ``text``.

        Args:
            task: a task name (see ``self.tasks.names()``).
            text: the input.
            stream: generate tasks only: return an iterator of :class:`ChatChunk`.
            **params: the task's parameters (``self.tasks.describe(task)["input_schema"]``):
                ``lang`` ("auto" or a code) for every task; ``labels`` and ``calibrate`` for
                classify; ``types`` (span tasks), ``max_tokens``, ``temperature``, ``top_p``,
                ``seed`` for extract; sampling options and ``system`` for generate.

        Returns:
            :class:`ClassifyResult`, :class:`ExtractResult` or :class:`ChatResult` by kind.

        Raises:
            UnknownTaskError: no such task.
            InvalidInputError: bad text or parameters (no model call is made).
        """
        spec = self.tasks.get(task)
        self._check_text(text)
        req = build_request(spec, text, params, max_tokens_limit=self.settings.max_tokens_limit)
        if stream and spec.kind != "generate":
            raise InvalidInputError(f"stream=True is only for generate tasks; {task!r} is {spec.kind}", param="stream")
        if spec.kind == "generate":
            request = self._generate_request(spec, req, text)
            chunks = chat_chunks(self.engine.generate(lambda b: plan_chat(b, request)))
            return chunks if stream else collect(chunks)
        compiled = self._compile(spec, req, "single")
        if spec.kind == "classify":
            return self._classify(compiled, text)
        budget = self.settings.max_input_tokens
        gen = self.engine.generate(lambda b: plan_extract(b, compiled, text, req.sampling, max_input_tokens=budget))
        parts: list[str] = []
        for delta in gen:
            parts.append(delta.text)
        return extract_result(compiled, gen.plan, "".join(parts), delta.finish_reason or "length", delta.completion_tokens)

    def _compile(self, spec: TaskSpec, req: Request, layout: str):
        """The compiled classify/extract task, cached (with its label token ids and calibration
        priors)."""
        key = (spec.name, id(spec), req.lang, req.labels, req.types, req.calibrate, layout)
        hit = self._compiled.get(key)
        if hit is None or hit[0] is not spec:
            compiled = (compile_classify if spec.kind == "classify" else compile_extract)(spec, req, layout)
            if len(self._compiled) >= 128:
                self._compiled.pop(next(iter(self._compiled)))
            hit = self._compiled[key] = (spec, compiled)
        return hit[1]

    def _task_fn(self, spec: TaskSpec, req: Request, layout: str):
        """A function (backend, text) -> result for a classify/extract task, run alone."""
        compiled = self._compile(spec, req, layout)
        budget = self.settings.max_input_tokens
        if spec.kind == "classify":
            return lambda b, text: classify(b, compiled, text, max_input_tokens=budget)
        sampling = req.sampling
        return lambda b, text: extract(b, compiled, text, sampling, max_input_tokens=budget)

    def _generate_request(self, spec: TaskSpec, req: Request, text: str,
                          history: Sequence[dict[str, Any]] | None = None) -> ChatRequest:
        template = spec.pick(spec.template, req.lang, "{text}")
        question = spec.pick(spec.question, req.lang)
        if question:
            template += "\n" + question
        shots: list[dict[str, Any]] = []
        for ex in [e for e in spec.examples if e.lang in (None, req.lang)] or list(spec.examples):
            shots += [{"role": "user", "content": template.replace("{text}", ex.text)},
                      {"role": "assistant", "content": ex.output}]
        messages = [*shots, *(history or []), {"role": "user", "content": template.replace("{text}", text)}]
        system = req.system if req.system is not None else spec.pick(spec.instructions, req.lang)
        request = ChatRequest.build(messages, system=system, sampling=req.sampling)
        for m in request.messages:
            if len(m["content"]) > self.settings.max_input_chars:
                raise InvalidInputError(
                    f"a message is longer than {self.settings.max_input_chars} characters", param="messages"
                )
        return request

    def chat(self, messages: str | Sequence[dict[str, Any]], *, stream: bool = False,
             system: str | None = None, **sampling: Any) -> ChatResult | Iterator[ChatChunk]:
        """Reply to a conversation.

        Args:
            messages: a string (one user message) or a list of ``{"role", "content"}``.
            stream: return an iterator of :class:`ChatChunk` instead of a :class:`ChatResult`.
            system: an optional system prompt, put first.
            **sampling: ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``max_tokens``,
                ``seed``, ``stop``, ``repetition_penalty``.

        Raises:
            InvalidInputError: bad messages or sampling values.
        """
        request = self._chat_request(messages, system, sampling)
        chunks = chat_chunks(self.engine.generate(lambda b: plan_chat(b, request)))
        return chunks if stream else collect(chunks)

    def analyze(self, text: str, history: Sequence[dict[str, Any]] | None = None, *,
                tasks: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
                **sampling: Any) -> AnalyzeResult:
        """Several tasks on one text.

        Without ``tasks``: the original demo, the sentiment of ``text`` plus a chat reply to it
        (``history`` is the conversation so far, without ``text``; it is not modified).

        With ``tasks`` (names, or name -> parameters): every task's result in ``results``. The
        classify/extract tasks run back to back in one engine job; with two or more of them the
        prompts put the text first (the ``shared`` layout), so the backend computes the text
        once and each further task pays only for its own instructions. Generate tasks (e.g.
        ``chat``) get ``history`` and ``**sampling``.

        Raises:
            UnknownTaskError / InvalidInputError: checked for every task before any model call.
        """
        self._check_text(text)
        if tasks is None:
            sentiment = self.sentiment(text)
            reply = self.chat([*(history or []), {"role": "user", "content": text}], **sampling)
            return AnalyzeResult(sentiment=sentiment, reply=reply)
        if isinstance(tasks, str):
            tasks = [tasks]
        items = list(tasks.items()) if isinstance(tasks, Mapping) else [(name, {}) for name in tasks]
        if not items:
            raise InvalidInputError("tasks is empty", param="tasks")
        if len({name for name, _ in items}) != len(items):
            raise InvalidInputError("tasks has duplicates", param="tasks")
        plans = []
        for name, params in items:
            spec = self.tasks.get(name)
            params = dict(params or {})
            if spec.kind == "generate":
                params = {**sampling, **params}
            plans.append((name, spec, build_request(spec, text, params, max_tokens_limit=self.settings.max_tokens_limit)))
        scored = [(name, spec, req) for name, spec, req in plans if spec.kind != "generate"]
        layout = "shared" if len(scored) >= 2 else "single"
        fns = [(name, self._task_fn(spec, req, layout)) for name, spec, req in scored]
        results: dict[str, Any] = {}
        if fns:
            results.update(self.engine.call(lambda b: {name: fn(b, text) for name, fn in fns}))
        for name, spec, req in plans:
            if spec.kind == "generate":
                request = self._generate_request(spec, req, text, history)
                results[name] = collect(chat_chunks(self.engine.generate(lambda b, r=request: plan_chat(b, r))))
        return AnalyzeResult(results={name: results[name] for name, _ in items})

    def _chat_request(self, messages: Any, system: str | None, sampling: dict[str, Any]) -> ChatRequest:
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise InvalidInputError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        sampling = {k: v for k, v in sampling.items() if v is not None}
        sampling.setdefault("max_tokens", self.settings.default_max_tokens)
        max_tokens = sampling["max_tokens"]
        # a non-integer max_tokens is rejected with its own message by SamplingParams below
        if isinstance(max_tokens, int) and max_tokens > self.settings.max_tokens_limit:
            raise InvalidInputError(
                f"max_tokens must be at most {self.settings.max_tokens_limit}", param="max_tokens"
            )
        if isinstance(sampling.get("stop"), list):
            sampling["stop"] = tuple(sampling["stop"])
        request = ChatRequest.build(messages, system=system, sampling=SamplingParams(**sampling))
        for m in request.messages:
            if len(m["content"]) > self.settings.max_input_chars:
                raise InvalidInputError(
                    f"a message is longer than {self.settings.max_input_chars} characters", param="messages"
                )
        return request

    def _check_text(self, text: object) -> None:
        if not isinstance(text, str):
            raise InvalidInputError("text must be a string", param="text")
        if not text.strip():
            raise InvalidInputError("text is empty", param="text")
        if len(text) > self.settings.max_input_chars:
            raise InvalidInputError(
                f"text is {len(text)} characters; the limit is {self.settings.max_input_chars}", param="text"
            )

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "AllInOne":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(chunks: Iterator[ChatChunk]) -> ChatResult:
    """Join a chunk stream into one :class:`ChatResult`."""
    parts: list[str] = []
    last = None
    for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    if last is None or last.finish_reason is None:  # pragma: no cover - the stream always ends with one
        raise RuntimeError("the reply stream ended without a finish reason")
    return ChatResult(text="".join(parts), finish_reason=last.finish_reason,
                      usage=last.usage or Usage(0, 0), truncated=last.truncated)

"""The Python API: ``AllInOne`` loads one model once and serves every task from it.

Every surface (CLI, HTTP, web UI) calls this class and nothing below it. A call checks its
input, lets the task's kind turn the text into plain engine jobs, submits them (the jobs of
several tasks together, so they share the engine's batches), and lets the kind turn the outputs
into a typed result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import DEFAULT, DeviceLock, Engine, EngineStats, GenerationStream, ModelInfo, ReplyStream, collect
from .errors import AllInOneError, InvalidInputError, ModelSourceError
from .learn.artifacts import Artifact, ArtifactStore, save
from .learn.artifacts import load as load_artifact
from .models import ModelSource, default_cache_dir, resolve_model
from .results import AnalyzeResult, ChatChunk, ChatResult, ClassifyResult, TaskResult
from .settings import Settings
from .tasks import (
    ChatProfile,
    ChatRequest,
    Limits,
    Request,
    TaskKind,
    TaskRegistry,
    TaskSpec,
    detect_lang,
    kind_of,
    reply_chunks,
)
from .tasks.chat import (
    CHAT_DRY_MULTIPLIER,
    DECLINE,
    DECLINE_OPENING,
    RETRY_OPENING,
    STEER,
    continuation_min_tokens,
    feeling_opening,
    guard_refusals,
    is_whole_reply,
    looks_harmful,
    may_tell_feeling,
    tells_of_loss,
)
from .tasks.prompting import pick
from .types import SamplingParams, check_text, is_blank, reply_max_tokens

if TYPE_CHECKING:
    from .batch import BatchSummary

log = logging.getLogger(__name__)
#: the task ``analyze`` labels a message with when no tasks are named
ANALYZE_SENTIMENT = "sentiment"
#: the task whose declaration is how the assistant talks (:class:`ChatProfile`): run as a task,
#: it replies through the one chat flow (:meth:`AllInOne._reply`), as :meth:`AllInOne.chat` does
CHAT_TASK = "chat"
#: the chat model ``chat_model="auto"`` takes when it is installed
AUTO_CHAT_MODEL = "embedded-1.5b"


class AllInOne:
    """One model, many tasks.

    Build it with :meth:`load`; it is safe to share between threads (all model work runs on
    the engine's single worker thread). Use it as a context manager or call :meth:`close`.
    Every model call takes ``timeout`` (seconds, queue wait included; ``None``: no limit;
    default: the ``request_timeout`` setting).
    """

    def __init__(self, engine: Engine, settings: Settings, *, load_seconds: float = 0.0,
                 source: ModelSource | None = None, chat_engine: Engine | None = None) -> None:
        self._engine = engine
        #: writes the chat replies: the task model's engine, or a second model's (``chat_model``)
        self._chat_engine = chat_engine or engine
        self.settings = settings
        self.load_seconds = load_seconds
        self._source = source
        self._sha256 = engine.info.sha256
        self.artifacts = ArtifactStore(settings.cache_dir or default_cache_dir(), settings.tasks_dir)
        self._artifacts: dict[str, tuple[int, Artifact | None, str | None]] = {}
        #: every task this instance serves: the built-ins, ``settings.tasks_dir``, and
        #: whatever :meth:`register_task` adds
        self.tasks = TaskRegistry(tasks_dir=settings.tasks_dir)
        self._limits = Limits(max_input_tokens=settings.max_input_tokens, max_tokens_limit=settings.max_tokens_limit)
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
        return cls.from_settings(Settings(model=model, backend=backend, **options))

    @classmethod
    def from_settings(cls, settings: Settings) -> "AllInOne":
        start = time.perf_counter()
        source = resolve_model(settings.model, cache_dir=settings.cache_dir)
        chat_source = resolve_chat_model(settings, source)
        if settings.weights != "shipped" and source.kind == "gguf":
            from .models.quantize import requantized

            # the same model in another layout: learned artifacts of the original still apply
            path = requantized(source.path, settings.weights, settings.cache_dir or default_cache_dir(),
                               threads=settings.n_threads)
            source = ModelSource("gguf", path, f"{source.name}-{settings.weights}", sha256=source.fingerprint())
        # two models on one CPU take turns, so a short request waits for at most one step of the other
        device = DeviceLock() if chat_source is not None else None

        def load(model: ModelSource) -> Engine:
            return Engine.load(
                model, backend=settings.backend, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
                dtype=settings.dtype, cache_dir=settings.cache_dir, kv_cache_mb=settings.kv_cache_mb,
                batch_invariant=settings.batch_invariant, max_queue=settings.max_queue,
                timeout=settings.request_timeout, max_batch=settings.max_batch, max_active=settings.max_active,
                device=device)

        engine = load(source)
        try:
            chat_engine = load(chat_source) if chat_source is not None else None
        except BaseException:
            engine.close()
            raise
        return cls(engine, settings, load_seconds=time.perf_counter() - start, source=source,
                   chat_engine=chat_engine)

    # -- info ---------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        """The loaded model: id, backend, context window, layers, hidden size, SHA-256."""
        return self._engine.info

    @property
    def model_id(self) -> str:
        return self._engine.info.model_id

    @property
    def backend_name(self) -> str:
        return self._engine.info.backend

    @property
    def chat_info(self) -> ModelInfo:
        """The model that writes chat replies: :attr:`info` unless ``chat_model`` loaded another."""
        return self._chat_engine.info

    @property
    def chat_model_id(self) -> str:
        return self._chat_engine.info.model_id

    @property
    def model_sha256(self) -> str | None:
        """The loaded model's SHA-256 (read once from the file when not known already); learned
        artifacts are tied to it. ``None`` for a model built in memory (tests)."""
        if self._sha256 is None and self._source is not None:
            self._sha256 = self._source.fingerprint()
        return self._sha256

    def stats(self) -> EngineStats:
        """Queue depth, active replies, KV cache use, prefix hit ratio and batch sizes now (with
        a chat model: both engines' figures added)."""
        if self._chat_engine is self._engine:
            return self._engine.stats()
        return self._engine.stats() + self._chat_engine.stats()

    def tokenize(self, text: str, *, timeout: float | None = DEFAULT) -> list[int]:
        """Token ids of ``text`` as plain text (control-token strings are not parsed).

        Raises:
            InvalidInputError: not a string, empty, or over ``max_input_chars``.
        """
        from .engine import TokenizeJob

        self._check_text(text)
        return self._engine.run(TokenizeJob(text), timeout=timeout)

    # -- tasks --------------------------------------------------------------------------
    def register_task(self, spec: TaskSpec | Mapping[str, Any] | str | Path) -> TaskSpec:
        """Add or replace a task: a :class:`TaskSpec`, a mapping of its fields, or a .toml path.

        Raises:
            TaskDeclarationError: the declaration is invalid (the message names the field).
        """
        return self.tasks.register(spec)

    def warm_up(self) -> None:
        """Compute and cache what a new process's first chat turns would otherwise wait for:
        the prefix of the sentiment task (:data:`ANALYZE_SENTIMENT`: its instructions and
        examples) in English and Chinese, which ``analyze`` and :meth:`chat` run on a feeling
        told (about 5 s per language for the embedded model on 2 cores). ``allinone serve``
        calls it before it reports ready.

        Raises:
            AllInOneError: as :meth:`run` (e.g. the engine closed).
        """
        for text in ("I am fine.", "我很好。"):
            self.run(ANALYZE_SENTIMENT, text)

    def sentiment(self, text: str, *, timeout: float | None = DEFAULT) -> ClassifyResult:
        """``positive`` or ``negative`` with probabilities; English or Chinese text.

        The same as ``run("sentiment", text)``. Text over ``max_input_tokens`` tokens (default
        1024) is cut to that budget, keeping its start, and the result has ``truncated=True``.
        """
        return self.run("sentiment", text, timeout=timeout)

    def run(self, task: str, text: str, *, stream: bool = False, timeout: float | None = DEFAULT,
            **params: Any) -> TaskResult | Iterator[ChatChunk]:
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
        item = self._prepare(task, text, params)
        kind, compiled, req = item[1:]
        if stream and not kind.streams:
            raise InvalidInputError(f"stream=True is only for generate tasks; {task!r} is {kind.name}", param="stream")
        if self._is_chat(task, kind):
            chunks = self._task_reply(text, req, timeout)
            return chunks if stream else ChatResult.from_chunks(chunks)
        if stream:
            return self._stream(kind, compiled, text, req, timeout)
        return self._execute([item], text, timeout)[task]

    def analyze(self, text: str, history: Sequence[dict[str, Any]] | None = None, *,
                tasks: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
                timeout: float | None = DEFAULT, **sampling: Any) -> AnalyzeResult:
        """Several tasks on one text.

        Without ``tasks``: the original demo, the sentiment of ``text`` plus a chat reply to it
        (``history`` is the conversation so far, without ``text``; it is not modified).

        With ``tasks`` (names, or name -> parameters): every task's result in ``results``. All
        their jobs go to the engine together, so the classify tasks share one micro-batch and
        the extract/generate replies decode side by side (the ``chat`` task's reply, which takes
        the chat flow of :meth:`chat`, follows them); with two or more classify/extract
        tasks the prompts put the text first (the ``shared`` layout), so the backend computes
        the text once and each further task pays only for its own instructions. Generate tasks
        (e.g. ``chat``) get ``history`` and ``**sampling``.

        Raises:
            UnknownTaskError / InvalidInputError: checked for every task before any model call;
                a bad parameter of one task is named ``tasks.<task>.<parameter>``.
        """
        if tasks is None:
            sentiment, chunks = self.analyze_stream(text, history, timeout=timeout, **sampling)
            return AnalyzeResult(sentiment=sentiment, reply=ChatResult.from_chunks(chunks))
        self._check_text(text)
        if isinstance(tasks, str):
            tasks = [tasks]
        named = list(tasks.items()) if isinstance(tasks, Mapping) else [(name, {}) for name in tasks]
        if not named:
            raise InvalidInputError("tasks is empty", param="tasks")
        if len({name for name, _ in named}) != len(named):
            raise InvalidInputError("tasks has duplicates", param="tasks")
        for name, params in named:
            if params is not None and not isinstance(params, Mapping):
                raise InvalidInputError(f"tasks.{name}: parameters must be an object of name: value, "
                                        f"got {type(params).__name__}", param=f"tasks.{name}")
        specs = [(name, self.tasks.get(name), dict(params or {})) for name, params in named]
        scored = sum(not kind_of(spec).streams for _, spec, _ in specs)
        layout = "shared" if scored >= 2 else "single"
        items, chats = [], {}
        for name, spec, params in specs:
            kind = kind_of(spec)
            try:
                if kind.streams:
                    item = self._prepare(name, text, {**sampling, **params}, history=history or ())
                    if self._is_chat(name, kind):
                        chats[name] = item[3]
                        continue
                    items.append(item)
                else:
                    items.append(self._prepare(name, text, params, layout=layout))
            except InvalidInputError as e:
                if e.param not in params:  # the text, or a parameter given to every task
                    raise
                # which of several tasks a bad parameter belongs to: the caller's own path to it
                raise type(e)(f"tasks.{name}: {e.message}", param=f"tasks.{name}.{e.param}") from e
        # the chat reply after the other tasks: a reply not yet read cannot be cancelled, so
        # one started beside them would run to max_tokens should they fail
        results = self._execute(items, text, timeout) if items else {}
        # the sentiment asked for is the one the reply would compute: the reply reuses it
        told = results.get(ANALYZE_SENTIMENT) if not dict(named).get(ANALYZE_SENTIMENT) else None
        told = told if isinstance(told, ClassifyResult) else None
        results.update({name: ChatResult.from_chunks(self._task_reply(text, req, timeout, sentiment=told))
                        for name, req in chats.items()})
        return AnalyzeResult(results={name: results[name] for name, _, _ in specs})

    def analyze_stream(self, text: str, history: Sequence[dict[str, Any]] | None = None, *,
                       system: str | None = None, timeout: float | None = DEFAULT,
                       **sampling: Any) -> tuple[ClassifyResult, Iterator[ChatChunk]]:
        """The original demo, streamed: the sentiment of ``text``, then the reply to it (after
        ``history``) as chunks; the reply's prompt is told the sentiment (the chat task's
        ``mood`` lines), so a complaint is met with sympathy and good news with joy. The one flow
        behind :meth:`analyze`, ``POST /v1/tasks/analyze`` and the web UI's chat.

        Raises:
            InvalidInputError: bad text, history or sampling options (no model call is made).
        """
        self._check_text(text)
        messages = [*(history or []), {"role": "user", "content": text}]
        self._chat_request(messages, system, sampling)  # bad messages or options fail before any model call
        sentiment = self.run(ANALYZE_SENTIMENT, text, timeout=timeout)
        return sentiment, self._answer(lambda mood: self._chat_request(messages, system, sampling, mood=mood),
                                       timeout, sentiment=sentiment)

    def fit(self, task: str, data: str | Path | Sequence[str | Path], *, method: str = "auto",
            limit: int | Sequence[int] | None = None,
            augment: bool = True, split_chars: bool | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Learn ``task`` from labelled rows and save what was learned for this model.

        Classify tasks learn a head (or a calibration) over the prompt's last-token state; span
        tasks (NER-like) learn a token tagger (:mod:`allinone.tasks.kinds.tagger`) from rows
        with ``entities``.

        The rows (JSONL: ``text`` + ``label``, the format of the evaluation files) are checked
        first; then each is run once through the task's prompt, every method of
        :mod:`allinone.learn.fit` is scored by 5-fold cross-validation on the rows, the best
        (or ``method``) is fit on all of them and saved as an artifact (next to a task from the
        tasks folder, else in the cache). From then on every surface serves the task with it;
        ``describe_task`` shows it.

        Args:
            task: a classify task.
            data: the JSONL file, or several (their rows together).
            method: ``auto`` (the best by cross-validation), or one of ``calibrate``, ``head``,
                ``head+logprobs`` (``prompt`` is always scored, for comparison).
            limit: only the first ``limit`` rows of each file, or one number per file (in the
                order of ``data``).
            augment: also train on copies of 30% of the rows with an instruction appended
                (robustness to instructions inside the text); a span task's copies keep their
                row's spans.
            split_chars: span tasks: read every CJK character as a token of its own (so each
                character of Chinese text can get its own tag; other text is tokenized as
                usual); ``None``: when any row is CJK text.
            progress: called with (rows done, rows in all) as the rows are computed.

        Returns:
            The report: task, chosen method, path (``None`` when prompting won), rows, the
            cross-validation figures of every method, seconds, rows/s; ``replaces`` when the
            new artifact hides one shipped with the package (its path and data:
            :meth:`reset_fit` goes back to it).

        Raises:
            TrainingDataError: bad rows (naming the file and line); nothing is written.
            InvalidInputError: a task kind that cannot be fit, an unknown method.
            ArtifactError: the artifact cannot be written (the previous one stays).
        """
        from .learn.data import load_labelled, load_spans
        from .learn.fit import LEARNED, METHODS
        from .tasks.kinds.classify import ClassifyKind, fit_classify
        from .tasks.kinds.extract import ExtractKind
        from .tasks.kinds.tagger import fit_spans

        spec = self.tasks.get(task)
        kind = kind_of(spec)
        spans = isinstance(kind, ExtractKind) and spec.spans is not None
        if not isinstance(kind, ClassifyKind) and not spans:
            raise InvalidInputError(f"task {task!r} (kind {kind.name}) has no spans; only classify tasks and "
                                    "span tasks (NER-like) can be fit", param="task")
        allowed = ("tagger",) if spans else LEARNED
        if method != "auto" and method not in allowed:
            raise InvalidInputError(f"method must be auto or one of {', '.join(allowed)}", param="method")
        sha = self.model_sha256
        if sha is None:
            raise InvalidInputError("this model has no SHA-256 to tie an artifact to", param="model")
        start = time.perf_counter()

        def run(jobs: list) -> list:
            return [h.result() for h in self._engine.submit_all(jobs, timeout=None)]

        tick = progress or (lambda done, total: None)
        if spans:
            types = list(spec.spans.types)
            rows = load_spans(data, types, limit=limit)
            split = split_chars if split_chars is not None else _any_cjk(rows.texts)
            tagger, cv = fit_spans(rows, types, run=run, n_layer=self.info.n_layer, split_chars=split, augment=augment,
                                   progress=tick)
            chosen, head_tensors, extra = "tagger", tagger.tensors(), tagger.meta()
        else:
            declared = [lab.name for lab in spec.labels] or None
            rows = load_labelled(data, declared, limit=limit)
            labels = declared or sorted(set(rows.labels))

            def compile_for(req: Request) -> Any:
                return self._compile_prompt_only(spec, kind, req)

            choice, features = fit_classify(kind, spec, rows, labels, compile_for=compile_for, run=run,
                                            limits=self._limits, n_layer=self.info.n_layer,
                                            methods=METHODS if method == "auto" else ("prompt", method),
                                            augment=augment, progress=tick)
            cv = choice.report
            chosen = choice.method
            head_tensors = choice.head.tensors() if choice.head is not None else None
            extra = {"method": chosen, "features": features, "labels": labels, "prompt_sha256": spec.prompt_sha256()}
        seconds = time.perf_counter() - start
        report: dict[str, Any] = {"task": task, "method": chosen, "path": None, "model_sha256": sha,
                                  "data": rows.describe(), "cv": cv, "seconds": round(seconds, 1),
                                  "rows_per_second": round(len(rows.texts) / max(seconds, 1e-9), 2)}
        if head_tensors is None:
            return report  # prompting won: nothing to keep
        meta = {"task": task, "kind": kind.name, **extra, "model_sha256": sha, "model": self.model_id,
                "data": rows.describe(), "cv": cv, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = save(Artifact(meta, head_tensors), self.artifacts.target(task, sha, declared_in=_declared_in(spec)))
        self._forget(task)
        report["path"] = str(path)
        shipped = self.artifacts.shipped(task, sha)
        if shipped is not None:  # the user's fit is found first from now on: say what it hides
            report["replaces"] = {"path": str(shipped), "data": load_artifact(shipped).meta.get("data")}
        return report

    def reset_fit(self, task: str) -> dict[str, Any]:
        """Undo :meth:`fit` for this model: delete the artifact it wrote for ``task`` (in the
        tasks folder or the cache), so that the artifact shipped with the package, if any, or
        the prompt serves the task again. A shipped artifact is never deleted.

        Returns:
            ``{"task", "removed": [paths], "method": what serves the task now}``; ``removed`` is
            empty when there was no fit of the user's to delete.

        Raises:
            UnknownTaskError: no such task.
            ArtifactError: the file cannot be deleted.
        """
        spec = self.tasks.get(task)
        removed: list[Path] = []
        if self.model_sha256 is not None:
            removed = self.artifacts.remove(task, self.model_sha256, declared_in=_declared_in(spec))
        self._forget(task)
        return {"task": task, "removed": [str(p) for p in removed], "method": self.describe_task(task)["method"]}

    def _compile_prompt_only(self, spec: TaskSpec, kind: TaskKind, req: Request) -> Any:
        key = (spec.name, id(spec), req.compile_key, "fit")
        hit = self._compiled.get(key)
        if hit is None:
            hit = self._compiled[key] = (spec, kind.compile(spec, req, "single"))
        return hit[1]

    def chat(self, messages: str | Sequence[dict[str, Any]], *, stream: bool = False,
             system: str | None = None, timeout: float | None = DEFAULT, cut: bool = True,
             **sampling: Any) -> ChatResult | Iterator[ChatChunk]:
        """Reply to a conversation.

        Without a system prompt (``system`` or a system message), a last message that only
        tells of a feeling ("My dog died this morning.", "外卖送错了，商家还不给退款。": it asks
        nothing, English or Chinese) first has its sentiment computed (one forward pass of the
        task model, as ``analyze`` does), and the reply is begun to meet it; any other message
        is answered without that pass (see :meth:`_answer`).

        Args:
            messages: a string (one user message) or a list of ``{"role", "content"}``.
            stream: return an iterator of :class:`ChatChunk` instead of a :class:`ChatResult`
                (a :class:`~allinone.engine.ReplyStream`: ``cancel()`` stops the reply from any
                thread, even while its prompt is being computed; ``close()`` from the reader's).
            system: an optional system prompt, put first.
            cut: a conversation that does not fit the context window (with room for
                ``max_tokens``, at most half the window) loses its oldest turns, then the end
                of its last message, and the result says ``truncated``; ``False``: it is kept
                whole, the reply gets the room left (finish reason ``length`` when it runs
                out), and one that leaves no room is refused (``ContextLengthError``).
            **sampling: ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``max_tokens``,
                ``seed``, ``stop``, ``repetition_penalty``, ``min_tokens``, ``dry_multiplier``
                (default :data:`~allinone.tasks.chat.CHAT_DRY_MULTIPLIER`; 0 turns DRY off).

        Raises:
            InvalidInputError: bad messages or sampling values.
            ContextLengthError: with ``cut=False``, a conversation that does not fit (raised
                by the stream, before its first chunk).
        """
        chunks = self._answer(lambda mood: self._chat_request(messages, system, sampling, mood=mood, cut=cut),
                              timeout)
        return chunks if stream else ChatResult.from_chunks(chunks)

    # -- the one flow -------------------------------------------------------------------
    def _prepare(self, task: str, text: str, params: Mapping[str, Any], *, layout: str = "single",
                 history: Sequence[dict[str, Any]] = ()) -> tuple[str, TaskKind, Any, Request]:
        """Check everything about one task run before any model call: (name, kind, compiled, request)."""
        spec = self.tasks.get(task)
        self._check_text(text)
        kind = kind_of(spec)
        req = kind.request(spec, text, params, self._limits, history=history)
        if req.history:
            self._chat_request([*req.history, {"role": "user", "content": text}], None, {})
        return task, kind, self._compile(spec, kind, req, layout), req

    def _compile(self, spec: TaskSpec, kind: TaskKind, req: Request, layout: str) -> Any:
        """The compiled task (with what it learned for this model, if anything applies), cached
        by declaration, language, label/type set and layout."""
        key = (spec.name, id(spec), req.compile_key, layout)
        hit = self._compiled.get(key)
        if hit is None or hit[0] is not spec:
            if len(self._compiled) >= 128:
                self._compiled.pop(next(iter(self._compiled)))
            hit = self._compiled[key] = (spec, kind.compile(spec, req, layout, self._artifact(spec)[0]))
        return hit[1]

    def _artifact(self, spec: TaskSpec) -> tuple[Artifact | None, str | None]:
        """What ``spec`` learned for this model, and why nothing is used when nothing is."""
        hit = self._artifacts.get(spec.name)
        if hit is not None and hit[0] == id(spec):
            return hit[1], hit[2]
        if not self.settings.learned:
            self._artifacts[spec.name] = (id(spec), None, "learned artifacts are off (learned=false): prompting")
            return None, self._artifacts[spec.name][2]
        artifact, note = self.artifacts.lookup(spec.name, self.model_sha256, spec.prompt_sha256())
        if note and artifact is None and self.model_sha256 is not None:
            log.warning("task %s: %s", spec.name, note)
        self._artifacts[spec.name] = (id(spec), artifact, note)
        return artifact, note

    def describe_task(self, name: str) -> dict[str, Any]:
        """:meth:`TaskRegistry.describe` plus how this model serves it: ``method`` (``prompt``,
        or what was learned) and ``learned`` (the artifact: method, data it was fit on, its
        cross-validation figures; ``None`` when prompting) and a ``note`` on a fallback."""
        spec = self.tasks.get(name)
        artifact, note = self._artifact(spec)
        out = {**self.tasks.describe(name), "method": artifact.method if artifact else "prompt",
               "learned": artifact.summary() if artifact else None}
        if note:
            out["note"] = note
        return out

    def list_tasks(self) -> list[dict[str, Any]]:
        """:meth:`describe_task` of every task, sorted by name."""
        return [self.describe_task(name) for name in self.tasks.names()]

    def _forget(self, name: str) -> None:
        self._artifacts.pop(name, None)
        for key in [k for k in self._compiled if k[0] == name]:
            del self._compiled[key]

    def _execute(self, items: Sequence[tuple[str, TaskKind, Any, Request]], text: str,
                 timeout: float | None) -> dict[str, Any]:
        """Run every task's plan on ``text`` together (see :meth:`_drive`)."""
        plans = {name: kind.plan(compiled, text, req) for name, kind, compiled, req in items}
        return self._drive(plans, timeout)

    def _drive(self, plans: Mapping[Any, Any], timeout: float | None, *, isolate: bool = False) -> dict[Any, Any]:
        """Run plans (:meth:`TaskKind.plan`) in rounds: each round submits the jobs of as many
        plans as half the engine's queue (``max_queue``) holds, at least one plan's, so they
        share the engine's batches; a plan whose round was computed goes to the back. With
        ``isolate``, a plan whose job fails gets its error as its result and the others go on;
        else the first error cancels the rest and is raised."""
        results: dict[Any, Any] = {}
        waiting = {}
        for key, plan in plans.items():
            waiting[key] = next(plan)
        budget = max(1, self.settings.max_queue // 2)
        while waiting:
            keys, size = [], 0
            for key, jobs in waiting.items():
                if keys and size + len(jobs) > budget:
                    break
                keys.append(key)
                size += len(jobs)
            handles = self._engine.submit_all([job for key in keys for job in waiting[key]], timeout=timeout)
            k = 0
            try:
                for key in keys:
                    mine = handles[k: k + len(waiting[key])]
                    k += len(mine)
                    try:
                        outputs = [collect(h) if isinstance(h, GenerationStream) else h.result() for h in mine]
                        del waiting[key]
                        waiting[key] = plans[key].send(outputs)
                    except StopIteration as done:
                        results[key] = done.value
                    except AllInOneError as exc:
                        if not isolate:
                            raise
                        results[key] = exc
                        waiting.pop(key, None)
            finally:
                for h in handles:  # a failed task cancels the work of the others
                    if isinstance(h, GenerationStream):
                        h.close()
                    else:
                        h.cancel()
        return {key: results[key] for key in plans}

    def run_many(self, task: str, texts: Sequence[str], *, timeout: float | None = DEFAULT,
                 **params: Any) -> list[TaskResult | AllInOneError]:
        """Run ``task`` on every text, their jobs submitted together so the engine batches them
        (the way to label a file: see :mod:`allinone.batch`). A text that fails (empty,
        over-long, anything the model refuses) gets its error in its place; the others go on.

        Raises:
            UnknownTaskError / InvalidInputError: an unknown task or bad parameters (for all).
        """
        spec = self.tasks.get(task)
        kind_of(spec).request(spec, "x", params, self._limits)  # bad parameters fail for all texts at once
        out: list[Any] = [None] * len(texts)
        plans: dict[int, Any] = {}
        chats: dict[int, Request] = {}
        for i, text in enumerate(texts):
            try:
                _, kind, compiled, req = self._prepare(task, text, params)
                if self._is_chat(task, kind):
                    chats[i] = req
                else:
                    plans[i] = kind.plan(compiled, text, req)
            except AllInOneError as exc:
                out[i] = exc
        group = max(1, min(self.settings.max_batch * 2, self.settings.max_queue // 2))
        keys = list(plans)
        for start in range(0, len(keys), group):
            chunk = {k: plans[k] for k in keys[start:start + group]}
            for k, result in self._drive(chunk, timeout, isolate=True).items():
                out[k] = result
        keys = list(chats)
        for start in range(0, len(keys), group):  # the replies of a group decode side by side
            started = {}
            for k in keys[start:start + group]:
                try:
                    started[k] = self._task_reply(texts[k], chats[k], timeout)
                except AllInOneError as exc:
                    out[k] = exc
            for k, chunks in started.items():
                try:
                    out[k] = ChatResult.from_chunks(chunks)
                except AllInOneError as exc:
                    out[k] = exc
        return out

    def batch(self, task: str, input: str | Path, output: str | Path, *, format: str | None = None,
              text_field: str = "text", id_field: str = "id", restart: bool = False, chunk_rows: int = 256,
              progress: Callable[[int, int | None], None] | None = None, **params: Any) -> "BatchSummary":
        """Run ``task`` on every row of a file and write the results, resumably (:mod:`allinone.batch`).

        The input (JSONL, CSV or Parquet, by extension or ``format``) is read ``chunk_rows`` rows at
        a time; each chunk goes through :meth:`run_many` (micro-batched) and is committed to
        ``output`` (``.jsonl`` or ``.parquet``) before the next. Each output row is the input
        row's ``id`` (the ``id_field``'s value as text, else the row number from 0), the result's
        fields as columns (classify: ``label``, ``scores`` per label...; extract: the fields of
        ``data`` such as ``entities``; generate: ``text``...) and ``error``: a row that cannot be
        used (not JSON, no text, empty, too long) gets its error and the job goes on. Call again
        with the same arguments after a crash or a kill: the rows already committed are kept and
        not computed again. The finished file appears at ``output`` when every row is in; its
        manifest ``<output>.progress.json`` stays next to it.

        Args:
            task: any task (classify, extract, generate, learned).
            input / output: the files. ``format``: the input's, when its extension does not say.
            text_field / id_field: the input's text and id fields (columns).
            restart: drop an earlier output of ``output`` and start over.
            progress: called with (rows done, rows in all) after every chunk.
            **params: the task's parameters, as for :meth:`run`.

        Returns:
            A :class:`~allinone.batch.BatchSummary`: rows ok and failed, rows/s, elapsed seconds, peak RSS.

        Raises:
            UnknownTaskError / InvalidInputError: an unknown task, bad parameters, a missing or
                unreadable input; nothing is written.
            BatchConflictError: ``output`` belongs to another job (the input, task, parameters or
                model changed) or is not a batch job's output; unless ``restart``.
            MissingExtraError: CSV or Parquet without pyarrow (the ``batch`` extra).
        """
        from .batch.runner import run_batch

        return run_batch(self, task, input, output, format=format, text_field=text_field, id_field=id_field,
                         restart=restart, chunk_rows=chunk_rows, progress=progress, **params)

    @classmethod
    def batch_on_ray(cls, task: str, input: str | Path, output: str | Path, *,
                     params: Mapping[str, Any] | None = None, address: str | None = None, actors: int | None = None,
                     cpus_per_actor: float = 1, format: str | None = None, text_field: str = "text",
                     id_field: str = "id", restart: bool = False, chunk_rows: int = 256,
                     progress: Callable[[int, int | None], None] | None = None,
                     **options: Any) -> "BatchSummary":
        """:meth:`batch` on a Ray cluster (the ``ray`` extra): the same rows, file and resume.

        Nothing is loaded here: each of ``actors`` Ray actors (default: the cluster's CPUs /
        ``cpus_per_actor``) loads the model once, from ``**options`` (any :class:`Settings`
        field: ``model``, ``tasks_dir``...), with ``cpus_per_actor`` threads unless ``n_threads``
        is given. ``address``: the cluster (``"auto"``, ``"host:6379"``, ``"ray://..."``); by
        default ``RAY_ADDRESS``, else the cluster started on this machine, else a new local one.
        ``params``: the task's parameters. See ``docs/scale-out.md``.

        Raises:
            MissingExtraError: Ray Data is not installed.
            the errors of :meth:`batch`, before the cluster is used; AllInOneError: an actor failed.
        """
        from .batch.ray import run_on_ray

        return run_on_ray(task, input, output, settings=Settings(**options), loader=cls.from_settings, params=params,
                          address=address, actors=actors, cpus_per_actor=cpus_per_actor, format=format,
                          text_field=text_field, id_field=id_field, restart=restart, chunk_rows=chunk_rows,
                          progress=progress)

    def _stream(self, kind: TaskKind, compiled: Any, text: str, req: Request,
                timeout: float | None) -> Iterator[ChatChunk]:
        (job,) = kind.jobs(compiled, text, req)
        return kind.chunks(compiled, self._engine.submit(job, timeout=timeout))

    def _is_chat(self, task: str, kind: TaskKind) -> bool:
        return task == CHAT_TASK and kind.streams

    def _task_reply(self, text: str, req: Request, timeout: float | None, *,
                    sentiment: ClassifyResult | None = None) -> Iterator[ChatChunk]:
        """The ``chat`` task run on ``text`` (after ``req.history``) as any task is, answered by
        the one chat flow (:meth:`_reply`: the chat model, the refusal guard, harmful requests
        declined) with the task's sampling defaults and its ``system`` and ``lang``;
        ``sentiment``: ``text``'s, when the caller asked for it too (:meth:`analyze`), so the
        reply is told it as :meth:`analyze_stream`'s is and it is not computed twice."""
        messages = [*req.history, {"role": "user", "content": text}]
        # the chat's repetition default, as for :meth:`chat` (DRY is not a task parameter)
        sampling = req.sampling.updated(dry_multiplier=CHAT_DRY_MULTIPLIER)
        profile = self._chat_profile()
        return self._answer(lambda mood: ChatRequest.build(messages, system=req.system, sampling=sampling,
                                                           profile=profile, mood=mood, lang=req.lang),
                            timeout, sentiment=sentiment)

    def _answer(self, build: Callable[[str | None], ChatRequest], timeout: float | None, *,
                sentiment: ClassifyResult | None = None) -> ReplyStream:
        """The reply to a conversation, the one flow of :meth:`chat`, :meth:`analyze_stream`
        and the ``chat`` task. ``build(mood)`` makes the request (``mood``: the last user
        message's sentiment label, which adds the chat task's mood line; ``None``: none) and
        raises its validation errors before any model call.

        The reply knows how the message sounds: with its ``sentiment`` (``analyze`` has it;
        :meth:`chat` computes it only for a message that may tell a feeling,
        :func:`~allinone.tasks.chat.may_tell_feeling`, and only when the caller set no system
        prompt, so a request costs no extra pass), a complaint gets an apology, good news joy,
        a loss told sympathy even when the head (fit on reviews) scores it positive; a feeling
        told (nothing asked) is met in the reply's first words
        (:func:`~allinone.tasks.chat.feeling_opening`), not left to the model, which answered
        "My dog died this morning." with "The dog died this morning." A caller's own system
        prompt decides how its assistant speaks: it never gets written words (from ``analyze``,
        which has the sentiment anyway, it gets the mood line)."""
        plain = build(None)
        own_system = plain.own_system
        text = plain.last_user
        lang = detect_lang(text)
        answers_user = plain.messages[-1]["role"] == "user"
        if sentiment is None:
            if own_system or not answers_user or not may_tell_feeling(text, lang):
                return self._reply(plain, timeout)
            sentiment = self.run(ANALYZE_SENTIMENT, text, timeout=timeout)
        mood = "negative" if tells_of_loss(text) else sentiment.label
        first = "" if own_system or not answers_user else feeling_opening(
            text, mood, sentiment.scores.get(sentiment.label, 0.0), lang)
        return self._reply(build(mood), timeout, retry_from=plain, mood=mood, reply_prefix=first)

    def _reply(self, request: ChatRequest, timeout: float | None, *,
               retry_from: ChatRequest | None = None, mood: str | None = None,
               reply_prefix: str = "") -> Iterator[ChatChunk]:
        """The reply to a chat request, the one path of :meth:`chat`, :meth:`analyze_stream`
        and every surface on them. A request whose last two user messages name a harm
        (:func:`~allinone.tasks.chat.looks_harmful`) is told to decline
        (:data:`~allinone.tasks.chat.DECLINE`) and its reply begins with
        :data:`~allinone.tasks.chat.DECLINE_OPENING`. A reply that opens with a refusal of a
        request that names no harm (:func:`~allinone.tasks.chat.looks_harmful`) is replaced by the reply to the
        request asked again (``retry_from``, else ``request``: ``analyze`` asks without the mood
        line, whose "I'm sorry to hear that" the model turns into "..., but I can't help") with
        :data:`~allinone.tasks.chat.STEER` in its system prompt and the reply begun with
        :data:`~allinone.tasks.chat.RETRY_OPENING` for ``mood`` (the message's sentiment)
        (:func:`~allinone.tasks.chat.guard_refusals`). ``reply_prefix``: the reply's first
        words, already written (``analyze``: :func:`~allinone.tasks.chat.feeling_opening`); they
        stream before the model writes, and a retry begins with them instead."""
        text = request.last_user
        lang = detect_lang(text)
        reply = ReplyStream()

        def begun(req: ChatRequest, opening: str) -> Iterator[ChatChunk]:
            # submitted now (a full queue fails here, as for any reply); the model continues
            # after words already written, which come first in the reply
            job = req.job(opening, min_tokens=continuation_min_tokens(opening), written_only=is_whole_reply(opening))
            return reply_chunks(reply.track(self._chat_engine.submit(job, timeout=timeout)))

        if any(map(looks_harmful, request.recent_user())):  # declined by prompt and first words; never asked again
            return reply.wrap(begun(request.steered(pick(DECLINE, lang)), pick(DECLINE_OPENING, lang)))
        chunks = begun(request, reply_prefix)
        # written words are sent before the verdict: a retry begins with them too
        opening = reply_prefix or pick(RETRY_OPENING.get(mood, RETRY_OPENING[None]), lang)
        return reply.wrap(guard_refusals(
            chunks, retry=lambda: begun((retry_from or request).steered(pick(STEER, lang)), opening), written=reply_prefix))

    def _chat_profile(self) -> ChatProfile | None:
        """The ``chat`` task's way of talking (see :class:`ChatProfile`), if it is declared."""
        return ChatProfile.from_spec(self.tasks.get("chat")) if "chat" in self.tasks else None

    def _chat_request(self, messages: Any, system: str | None, sampling: Mapping[str, Any],
                      mood: str | None = None, cut: bool = True) -> ChatRequest:
        options = {k: v for k, v in sampling.items() if v is not None}
        options["max_tokens"] = reply_max_tokens(options.get("max_tokens"), self.settings.default_max_tokens,
                                                 self.settings.max_tokens_limit)
        options.setdefault("dry_multiplier", CHAT_DRY_MULTIPLIER)
        return ChatRequest.build(messages, system=system, sampling=SamplingParams.from_options(options),
                                 profile=self._chat_profile(), mood=mood, cut=cut,
                                 max_chars=self.settings.max_input_chars)

    def _check_text(self, text: object) -> None:
        if not isinstance(text, str):
            raise InvalidInputError("text must be a string", param="text")
        if is_blank(text):
            raise InvalidInputError("text is empty", param="text")  # whitespace or invisible characters only
        if len(text) > self.settings.max_input_chars:
            raise InvalidInputError(
                f"text is {len(text)} characters; the limit is {self.settings.max_input_chars}", param="text")
        check_text(text, "text")

    # -- lifetime -----------------------------------------------------------------------
    def close(self, grace: float = 30.0) -> None:
        """Free the model(s): requests running or queued may finish for ``grace`` seconds, what
        is left then fails with :class:`~allinone.errors.ShuttingDownError`, and later calls
        raise it (see :meth:`Engine.stop`). Idempotent; safe from any thread."""
        self._engine.close(grace)
        if self._chat_engine is not self._engine:
            self._chat_engine.close(grace)

    def __enter__(self) -> "AllInOne":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_chat_model(settings: Settings, main: ModelSource) -> ModelSource | None:
    """The model that writes chat replies when it is not ``main`` (the ``chat_model`` setting).

    ``None`` (the default) and a model that resolves to ``main``'s file give ``None``: one
    model serves everything. ``"auto"`` is :data:`AUTO_CHAT_MODEL` when its packages are
    installed (the ``large`` extra), else ``None``, logged. Learned task artifacts stay with the
    task model; the chat model only writes replies (measured in docs/evaluation.md, "Chat"). It
    is loaded as shipped (the ``weights`` setting re-quantizes the task model only).

    Raises:
        ModelSourceError: a named ``chat_model`` cannot be found or fails its checksum.
    """
    name = settings.chat_model
    if name is None:
        return None
    if name == "auto":
        try:
            chat = resolve_model(AUTO_CHAT_MODEL, cache_dir=settings.cache_dir)
        except ModelSourceError as exc:
            log.info("chat_model=auto: %s is not available (%s); chat replies use %s", AUTO_CHAT_MODEL,
                     str(exc).splitlines()[0], main.name)
            return None
    else:
        chat = resolve_model(name, cache_dir=settings.cache_dir)
    return None if Path(chat.path).resolve() == Path(main.path).resolve() else chat


def _any_cjk(texts: Sequence[str]) -> bool:
    from .tasks import detect_lang

    return any(detect_lang(t) == "zh" for t in texts)


def _declared_in(spec: TaskSpec) -> Path | None:
    """The file a task was declared in (its artifact goes next to it), or None (built-in or
    registered from Python: the cache)."""
    return Path(spec.source) if spec.source and not spec.source.startswith("<") else None


"""What every task kind has in common: the request parameters and the interface of a kind.

A *kind* is one object per way of answering (``classify``: score a label set; ``extract``: JSON
to a schema; ``generate``: free text). It owns its parameters, compiles a declaration into a
prompt, turns a text into plain engine jobs, and turns the jobs' outputs into a typed result.
It never runs anything itself: :class:`~allinone.api.AllInOne` submits the jobs to the engine
(all jobs of several tasks together, so they share the engine's batches) and hands the outputs
back to :meth:`TaskKind.result`.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import InvalidInputError
from ...types import Message, SamplingParams, check_text, reply_max_tokens
from ..prompting import detect_lang

if TYPE_CHECKING:
    from ...engine import GenerationStream, Job
    from ...results import ChatChunk
    from ..spec import TaskSpec


@dataclass(frozen=True)
class Limits:
    """The settings a kind needs: the input text's token budget and the largest ``max_tokens``."""

    max_input_tokens: int = 1024
    max_tokens_limit: int = 2048


@dataclass(frozen=True)
class Request:
    """Validated per-request parameters of one task run.

    ``labels`` / ``types`` are ((name, description), ...); ``history`` the conversation before
    the text (generate tasks in ``analyze``).
    """

    lang: str
    labels: tuple[tuple[str, str], ...] | None = None
    types: tuple[tuple[str, str], ...] | None = None
    calibrate: bool = False
    sampling: SamplingParams | None = None
    system: str | None = None
    history: tuple[Message, ...] = ()
    max_input_tokens: int = 1024

    @property
    def compile_key(self) -> tuple:
        """What the compiled prompt depends on (the rest varies per request)."""
        return (self.lang, self.labels, self.types, self.calibrate)


def named_list(value: Any, param: str) -> tuple[tuple[str, str], ...]:
    """``["a", "b"]``, ``"a,b"`` or ``{"a": "description"}`` -> ((name, description), ...).

    Raises:
        InvalidInputError: not a list of non-empty strings or a mapping; duplicates; over 200.
    """
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Mapping):
        items = [(str(k), str(v or "")) for k, v in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = [(v, "") if isinstance(v, str) else (None, "") for v in value]
    else:
        raise InvalidInputError(f"{param} must be a list of strings or an object of name: description", param=param)
    names = [n for n, _ in items]
    if not items or any(not isinstance(n, str) or not n.strip() for n in names):
        raise InvalidInputError(f"{param} must be a non-empty list of non-empty strings", param=param)
    if len({n.strip() for n in names}) != len(names):  # "positive" and "positive " are one name
        raise InvalidInputError(f"{param} has duplicates", param=param)
    if len(items) > 200:
        raise InvalidInputError(f"{param}: at most 200 entries", param=param)
    for name, description in items:
        check_text(name, param)
        check_text(description, param)
    return tuple((n.strip(), d) for n, d in items)


def resolve_lang(spec: "TaskSpec", params: Mapping[str, Any], text: Any) -> str:
    """The request's prompt language: ``params["lang"]`` (else the task's default); ``auto`` ->
    detected from ``text``; else a code the task has prompts in (another code would be served
    by the English prompt under a name it does not have, and a learned head's rules per
    language would not apply).

    Raises:
        InvalidInputError: not ``auto`` or a code such as ``en`` or ``zh``; not one of the
            task's languages.
    """
    value = params.get("lang", spec.defaults.lang)
    languages = spec.languages()
    if not isinstance(value, str) or not re.fullmatch(r"auto|[a-z]{2,3}(-[A-Za-z0-9]+)?", value):
        raise InvalidInputError("lang must be 'auto' or a language code such as 'en' or 'zh'", param="lang")
    if languages and value != "auto" and value not in languages:
        raise InvalidInputError(f"lang {value!r}: this task's prompts are in {', '.join(languages)} (or use 'auto')",
                                param="lang")
    return detect_lang(text) if value == "auto" and isinstance(text, str) else ("en" if value == "auto" else value)


def sampling_from(spec: "TaskSpec", params: Mapping[str, Any], limits: Limits, *, keys: Sequence[str],
                  fixed: Mapping[str, Any] | None = None) -> SamplingParams:
    """Sampling parameters from the request's ``keys`` over the task's defaults.

    Raises:
        InvalidInputError: a bad value, or ``max_tokens`` over the limit.
    """
    d = spec.defaults
    max_tokens = reply_max_tokens(params.get("max_tokens"), d.max_tokens, limits.max_tokens_limit)
    values = {"temperature": d.temperature, "top_p": d.top_p, "max_tokens": max_tokens}
    values.update({k: params[k] for k in keys if k in params and k != "max_tokens"})
    values.update(fixed or {})
    return SamplingParams.from_options(values)


class TaskKind:
    """The interface of a task kind (see the module docstring); subclasses fill it in."""

    #: the kind's name, as written in a declaration's ``kind``
    name: ClassVar[str]
    #: its results can be streamed (generate)
    streams: ClassVar[bool] = False
    #: the declaration fields only this kind may set (``labels``, ``output_schema``, ...)
    fields: ClassVar[frozenset[str]] = frozenset()
    #: the parameters every kind takes
    common_params: ClassVar[frozenset[str]] = frozenset({"lang"})

    def check_spec(self, spec: "TaskSpec") -> None:
        """Kind-specific checks of a declaration (raise ``ValueError`` naming the field)."""

    def params(self, spec: "TaskSpec") -> set[str]:
        """The request parameters this task accepts."""
        return set(self.common_params)

    def request(self, spec: "TaskSpec", text: str, params: Mapping[str, Any], limits: Limits,
                history: Sequence[Message] = ()) -> Request:
        """Check ``params`` and fill in the task's defaults.

        Raises:
            InvalidInputError: an unknown parameter or a bad value.
        """
        params = {k: v for k, v in params.items() if v is not None}
        unknown = set(params) - self.params(spec)
        if unknown:
            raise InvalidInputError(
                f"task {spec.name!r} ({spec.kind}) does not take {', '.join(sorted(unknown))}; "
                f"it takes: {', '.join(sorted(self.params(spec)))}", param=sorted(unknown)[0])
        return self._request(spec, text, params, limits, tuple(history))

    def _request(self, spec: "TaskSpec", text: str, params: dict[str, Any], limits: Limits,
                 history: tuple[Message, ...]) -> Request:
        return Request(lang=resolve_lang(spec, params, text),
                       max_input_tokens=limits.max_input_tokens, history=history)

    def compile(self, spec: "TaskSpec", req: Request, layout: str = "single",
                artifact: Any = None) -> Any:
        """The compiled task for this declaration, language and label/type set (cached by the
        caller), using what the task learned for this model (``artifact``) when it applies."""
        raise NotImplementedError

    def plan(self, compiled: Any, text: str, req: Request) -> Generator[list["Job"], list[Any], Any]:
        """How to answer ``text``, as rounds of engine jobs: yields the jobs of a round, receives
        their outputs (in order), and returns the typed result. The default is one round:
        :meth:`jobs`, then :meth:`result`; a kind that needs the model twice (retrieve, then
        score) yields twice."""
        outputs = yield self.jobs(compiled, text, req)
        return self.result(compiled, outputs, req)

    def jobs(self, compiled: Any, text: str, req: Request) -> list["Job"]:
        """The engine jobs that answer ``text``."""
        raise NotImplementedError

    def result(self, compiled: Any, outputs: Sequence[Any], req: Request) -> Any:
        """The typed result from the jobs' outputs (in the order of :meth:`jobs`)."""
        raise NotImplementedError

    def chunks(self, compiled: Any, stream: "GenerationStream") -> Iterator["ChatChunk"]:
        """Streamed result pieces (kinds with ``streams``)."""
        raise InvalidInputError(f"stream=True is only for generate tasks; this one is {self.name}", param="stream")

    def input_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        """JSON Schema of a request to this task (``text`` plus its parameters)."""
        return {"type": "object", "properties": {
            "text": {"type": "string", "description": "the input text"},
            "lang": {"type": "string", "default": spec.defaults.lang,
                     "description": f"prompt language: auto (detect), or one of {', '.join(spec.languages())}"}},
            "required": ["text"], "additionalProperties": False}

    def output_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        """JSON Schema of the task's result (``to_dict()`` of what ``run`` returns)."""
        raise NotImplementedError

    def describe(self, spec: "TaskSpec") -> dict[str, Any]:
        """Kind-specific fields of a task listing (labels, types)."""
        return {}


USAGE_SCHEMA = {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                 "completion_tokens": {"type": "integer"},
                                                 "total_tokens": {"type": "integer"}}}
FINISH_SCHEMA = {"type": "string", "enum": ["stop", "length"]}
GENERATION_PARAMS = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
}

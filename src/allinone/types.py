"""Plain types shared by every layer (engine, backends, tasks, surfaces); they import nothing of
allinone but :mod:`allinone.errors`, so any module may use them without an import cycle."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import InvalidInputError

#: why a reply ended: an end token or a stop string ("stop"), or ``max_tokens`` / a full
#: context window ("length")
FinishReason = Literal["stop", "length"]
#: a chat message: ``{"role": "system" | "user" | "assistant", "content": str}``
Message = Mapping[str, Any]
ROLES = ("system", "user", "assistant")
#: other names of a role, read as it: "developer" is OpenAI's newer name for the system role
ROLE_ALIASES = {"developer": "system"}
#: OpenAI roles that carry tool calls and their results, which this server does not make
UNSUPPORTED_ROLES = ("tool", "function")

#: the largest accepted sampling seed (numpy's generators take seeds in [0, 2**64))
MAX_SEED = 2**64 - 1
#: the smallest: OpenAI's clients send signed 64-bit seeds (read modulo 2**64)
MIN_SEED = -(2**63)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters, validated on construction.

    Args:
        temperature: softmax temperature; 0 means greedy (argmax) decoding.
        top_p: nucleus sampling mass in [0, 1] (Holtzman et al. 2020); the most likely token is
            always kept, so 0 samples only it (as OpenAI's API takes ``top_p: 0``).
        top_k: keep only the k most likely tokens; 0 disables.
        max_tokens: at most this many new tokens (>= 1).
        seed: makes sampling reproducible for the same prompt and backend; -2**63 .. 2**64-1
            (OpenAI's and llama.cpp's clients send signed 64-bit seeds such as -1); a negative
            seed is read modulo 2**64, so -1 and 2**64-1 draw the same tokens.
        stop: strings that end the reply; the stop string itself is not returned.
        repetition_penalty: CTRL-style penalty (Keskar et al. 2019) on tokens already present;
            1.0 disables.
        min_tokens: the model samples no end token before it has sampled this many tokens
            (vLLM's ``min_tokens``, and as there at most ``max_tokens``); stop strings and a
            full context still end the reply. 0 disables.
        dry_multiplier: strength of the DRY penalty on a reply repeating its own words
            (:func:`allinone.backends.sampling.sample`; llama.cpp's ``--dry-multiplier``,
            0.8 is its author's recommendation); 0 disables.

    Raises:
        InvalidInputError: a value is out of range or of the wrong type.
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.05
    min_tokens: int = 0
    dry_multiplier: float = 0.0

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"{param} {why}", param=param)

        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not number(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"must be a number between 0 and 2, got {self.temperature!r}")
        if not number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise bad("top_p", f"must be a number between 0 and 1, got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise bad("seed", f"must be an integer from -2**63 to 2**64-1, got {self.seed!r}")
        if self.seed is not None and self.seed < 0:
            object.__setattr__(self, "seed", self.seed % (MAX_SEED + 1))
        if not number(self.repetition_penalty) or not 0.5 <= self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be a number between 0.5 and 2, got {self.repetition_penalty!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not number(self.dry_multiplier) or not 0.0 <= self.dry_multiplier <= 5.0:
            raise bad("dry_multiplier", f"must be a number between 0 and 5, got {self.dry_multiplier!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if (not isinstance(self.stop, tuple) or len(self.stop) > 4
                or any(not isinstance(s, str) or not s for s in self.stop)):
            raise bad("stop", "must be up to 4 non-empty strings")
        for s in self.stop:
            check_text(s, "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def updated(self, **changes: object) -> "SamplingParams":
        """A copy with ``changes`` applied (``None`` values are ignored) and validated."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, base: "SamplingParams | None" = None) -> "SamplingParams":
        """Parameters from keyword options (``None`` values are ignored) over ``base``.

        Raises:
            InvalidInputError: an unknown option or a bad value.
        """
        unknown = set(options) - set(SAMPLING_KEYS)
        if unknown:
            raise InvalidInputError(f"unknown sampling option(s): {', '.join(sorted(unknown))}",
                                    param=sorted(unknown)[0])
        return (base or cls()).updated(**options)


def reply_max_tokens(given: Any, default: int, limit: int) -> Any:
    """``max_tokens`` of a request: ``given``, or ``default`` (a task's or the server's) when
    ``None``. A default over ``limit`` is lowered to it, as it is not the caller's choice.

    Raises:
        InvalidInputError: ``given`` is an integer over ``limit`` (other bad values are left to
            :class:`SamplingParams`, whose message says what is accepted).
    """
    if given is None:
        return min(default, limit)
    if isinstance(given, int) and not isinstance(given, bool) and given > limit:
        raise InvalidInputError(f"max_tokens must be at most {limit}", param="max_tokens")
    return given


#: the names of the sampling options (the fields of :class:`SamplingParams`)
SAMPLING_KEYS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))


@dataclass
class TextDelta:
    """A piece of decoded reply text; the last one carries the finish reason and token count."""

    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


def validate_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Check and normalize chat messages to ``[{"role", "content"}]``.

    Content may be a string or an OpenAI-style list of ``{"type": "text", "text": ...}`` parts
    (joined with newlines). Roles: system (or developer, OpenAI's newer name for it), user,
    assistant. Several system messages, system
    messages in the middle and consecutive same-role messages are allowed (the template decides).

    Raises:
        InvalidInputError: not a non-empty list of messages with a known role and text content.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {role, content}", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            # tool results need the tool calls this server never makes
            why = " (tool calling is not supported)" if role in UNSUPPORTED_ROLES else ""
            raise InvalidInputError(
                f"messages[{i}].role must be one of {', '.join([*ROLES, *ROLE_ALIASES])}, got {m.get('role')!r}{why}",
                param=f"messages[{i}].role")
        out.append({"role": role, "content": content_text(m.get("content"), f"messages[{i}].content")})
    return out


def is_blank(text: str) -> bool:
    """Nothing to read: every character is whitespace, a control character (Unicode category Cc,
    e.g. NUL) or an invisible format character (Cf: zero-width space, BOM, ...)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def check_text(value: str, param: str, where: str | None = None) -> str:
    """``value`` if it can be written as UTF-8, the only text a tokenizer reads.

    A Python string (or a JSON string with ``\\ud800`` escapes) can hold a lone surrogate,
    half of a UTF-16 pair, which is not a character and has no UTF-8 form.

    Raises:
        InvalidInputError: naming the position of the first lone surrogate.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(value[exc.start])
        raise InvalidInputError(f"{where or param} holds a lone surrogate (U+{bad:04X}) at position {exc.start}, "
                                "which is not a character; send valid Unicode text", param=param) from None
    return value


def content_text(content: Any, where: str = "content") -> str:
    """A message content as text: a string, or a list of text parts joined by newlines.

    Raises:
        InvalidInputError: anything else, or text that is not valid Unicode.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return check_text(content, where)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(check_text(part["text"], where))
            else:
                raise InvalidInputError(f"{where}: only text content parts are supported", param=where)
        return "\n".join(parts)
    raise InvalidInputError(f"{where} must be a string or a list of text parts", param=where)

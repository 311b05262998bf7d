"""Typed results returned by the Python API; every one has ``to_dict()`` for JSON surfaces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifyResult(_Result):
    """A label picked by scoring every label's continuation (never generated freely).

    ``scores`` maps each label to its probability (they sum to 1 over the label set);
    ``truncated`` says the input was cut to the token budget before scoring.
    """

    label: str
    scores: dict[str, float]
    truncated: bool = False


# Sentiment is a classification over {"positive", "negative"}.
SentimentResult = ClassifyResult


@dataclass(frozen=True)
class Usage(_Result):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class ChatResult(_Result):
    """A finished chat reply. ``finish_reason`` is ``stop`` (an end token or stop string)
    or ``length`` (``max_tokens`` or the context window reached)."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class ChatChunk(_Result):
    """One piece of a streamed reply. ``text`` never splits a multi-byte character.
    The last chunk has ``finish_reason`` set and ``usage`` filled (its ``text`` may be empty)."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict() if self.usage else None,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class AnalyzeResult(_Result):
    """The original demo: the sentiment of the user's message plus a chat reply."""

    sentiment: ClassifyResult
    reply: ChatResult
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"sentiment": self.sentiment.to_dict(), "reply": self.reply.to_dict(), **self.extra}

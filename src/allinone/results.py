"""Typed results returned by the Python API; every one has ``to_dict()`` for JSON surfaces."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .types import FinishReason


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassifyResult(_Result):
    """A label picked by scoring every label's continuation (never generated freely).

    ``scores`` maps each label to its probability (they sum to 1 over the label set);
    ``truncated`` says the input was cut to the token budget before scoring. ``coverage`` is
    the probability the model gives to answering with any of the labels at all (their
    verbalizers' summed probability among every possible continuation, before normalizing
    over the labels); when it is below :data:`LOW_COVERAGE`, the labels do not fit what the
    model would say about the text (e.g. labels that have nothing to do with it), and
    ``warning`` says so.
    """

    label: str
    scores: dict[str, float]
    truncated: bool = False
    coverage: float | None = None
    warning: str | None = None


#: below this label coverage a classify result carries a warning (chosen on the training pools:
#: the built-in tasks' labels hold 0.9 and more of the probability on nearly every pool row;
#: labels unrelated to the text hold under 0.01, see docs/evaluation.md)
LOW_COVERAGE = 0.1

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

    @classmethod
    def from_chunks(cls, chunks: Iterable["ChatChunk"]) -> "ChatResult":
        """Join a chunk stream (ending with the chunk that has the finish reason) into one result.

        Raises:
            ValueError: the stream ended without a finish reason.
        """
        parts: list[str] = []
        last = None
        for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
        if last is None or last.finish_reason is None:
            raise ValueError("the reply stream ended without a finish reason")
        return cls(text="".join(parts), finish_reason=last.finish_reason, usage=last.usage or Usage(0, 0),
                   truncated=last.truncated)


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
class ExtractResult(_Result):
    """Structured output of an ``extract`` task, always valid under the task's output schema.

    ``data`` is the JSON object (for span tasks such as NER every span has ``start``/``end``
    character offsets with ``text[start:end] == span text``). ``dropped`` counts spans the model
    gave that do not occur in the input (they are removed). ``finish_reason`` is ``length`` when
    generation hit ``max_tokens``: ``data`` then keeps only the items completed before the cut.
    ``repaired`` says the model's JSON was not used as it came (cut off, or replaced by the
    smallest valid value when nothing usable was left).
    """

    data: dict[str, Any]
    finish_reason: FinishReason
    usage: Usage
    dropped: int = 0
    truncated: bool = False
    repaired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "dropped": self.dropped,
            "finish_reason": self.finish_reason,
            "repaired": self.repaired,
            "truncated": self.truncated,
            "usage": self.usage.to_dict(),
        }


# What ``AllInOne.run`` returns, by task kind: classify, extract, generate.
TaskResult = ClassifyResult | ExtractResult | ChatResult


@dataclass(frozen=True)
class AnalyzeResult(_Result):
    """The original demo (the sentiment of the user's message plus a chat reply), or with
    ``tasks=[...]`` one result per task in ``results`` (name -> result)."""

    sentiment: ClassifyResult | None = None
    reply: ChatResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sentiment is not None:
            out["sentiment"] = self.sentiment.to_dict()
        if self.reply is not None:
            out["reply"] = self.reply.to_dict()
        if self.results:
            out["results"] = {name: r.to_dict() for name, r in self.results.items()}
        return {**out, **self.extra}

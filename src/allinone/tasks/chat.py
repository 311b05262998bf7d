"""Open-domain multi-turn chat: a conversation validated at the edge, as one engine job.

When the conversation does not fit the context window, the engine drops its oldest turns first
(see :mod:`allinone.engine.prompts`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import GenerateJob, Prompt
from ..errors import InvalidInputError
from ..types import SamplingParams, validate_messages


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, ready for the engine.

    ``messages`` is a list of ``{"role", "content"}`` (a plain string becomes one user message);
    ``system`` (optional) is put first as a system message.
    """

    messages: tuple[dict[str, str], ...]
    sampling: SamplingParams

    @classmethod
    def build(cls, messages: str | Sequence[dict[str, Any]], *, system: str | None = None,
              sampling: SamplingParams | None = None, profile: "ChatProfile | None" = None,
              mood: str | None = None) -> "ChatRequest":
        """Validate the input at the edge.

        Raises:
            InvalidInputError: empty messages, unknown roles, non-text content, or a conversation
                with nothing for the model to answer (no user message / empty last user message).
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system is not None:
            if not isinstance(system, str):
                raise InvalidInputError("system must be a string", param="system")
            messages = [{"role": "system", "content": system}, *messages]
        msgs = validate_messages(messages)
        users = [m for m in msgs if m["role"] == "user"]
        if not users:
            raise InvalidInputError("messages must contain at least one user message", param="messages")
        if msgs[-1]["role"] == "user" and not msgs[-1]["content"].strip():
            raise InvalidInputError("the last user message is empty", param="messages")
        if profile is not None:
            msgs = profile.apply(msgs, mood)
        return cls(tuple(msgs), sampling or SamplingParams())

    def job(self) -> GenerateJob:
        """The engine's job for this conversation."""
        return GenerateJob(Prompt(messages=self.messages), self.sampling)


@dataclass(frozen=True)
class ChatProfile:
    """How the assistant talks when the caller sets no system prompt, from the ``chat`` task's
    declaration: its instructions (the system prompt, in the language of the user's last
    message), its examples (earlier turns, in that language, put before the conversation) and
    its ``mood`` lines (added to the system prompt when the reply is to a message whose
    sentiment is known, e.g. ``negative``: acknowledge the feeling first)."""

    instructions: dict[str, str]
    examples: tuple[tuple[str | None, str, str], ...] = ()
    mood: dict[str, dict[str, str]] | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> "ChatProfile":
        return cls(dict(spec.instructions), tuple((ex.lang, ex.text, ex.output) for ex in spec.examples),
                   dict(spec.mood) or None)

    def apply(self, msgs: list[dict[str, str]], mood: str | None = None) -> list[dict[str, str]]:
        """``msgs`` with the profile's system prompt and example turns first, unless the
        conversation has a system message of its own (then only the mood line is added to it)."""
        from .prompting import detect_lang, pick

        last = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        lang = detect_lang(last)
        line = pick(self.mood.get(mood, {}), lang) if self.mood and mood else ""
        if any(m["role"] == "system" for m in msgs):
            if not line:
                return msgs
            first = next(i for i, m in enumerate(msgs) if m["role"] == "system")
            return [*msgs[:first], {**msgs[first], "content": f"{msgs[first]['content']}\n{line}"}, *msgs[first + 1:]]
        system = pick(self.instructions, lang)
        if line:
            system = f"{system}\n{line}"
        shots = [ex for ex in self.examples if ex[0] in (None, lang)]
        turns = [t for _, user, reply in shots for t in ({"role": "user", "content": user},
                                                         {"role": "assistant", "content": reply})]
        return [{"role": "system", "content": system}, *turns, *msgs]

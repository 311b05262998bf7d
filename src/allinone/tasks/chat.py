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
              sampling: SamplingParams | None = None) -> "ChatRequest":
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
        return cls(tuple(msgs), sampling or SamplingParams())

    def job(self) -> GenerateJob:
        """The engine's job for this conversation."""
        return GenerateJob(Prompt(messages=self.messages), self.sampling)

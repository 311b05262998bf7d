"""Open-domain multi-turn chat: message validation, context budgeting and streamed replies."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.base import SamplingParams
from ..backends.chat_template import validate_messages
from ..errors import InvalidInputError
from ..results import ChatChunk, Usage

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..engine import Generation, GenerationStream


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
        msgs = validate_messages(messages)
        if system is not None:
            msgs = [{"role": "system", "content": system}, *msgs]
        users = [m for m in msgs if m["role"] == "user"]
        if not users:
            raise InvalidInputError("messages must contain at least one user message", param="messages")
        if msgs[-1]["role"] == "user" and not msgs[-1]["content"].strip():
            raise InvalidInputError("the last user message is empty", param="messages")
        return cls(tuple(msgs), sampling or SamplingParams())


def prepare_chat(backend: "Backend", request: ChatRequest) -> tuple[list[int], SamplingParams, bool]:
    """Render the conversation to token ids within the context window.

    When prompt + ``max_tokens`` does not fit, the oldest non-system turns are dropped first, then
    the remaining last message is cut (keeping its start); ``max_tokens`` is then lowered to what
    is left. Returns (prompt ids, sampling, truncated).
    """
    msgs = list(request.messages)
    sampling = request.sampling
    budget = backend.n_ctx - 1
    reply_room = min(sampling.max_tokens, budget // 2)
    ids = backend.render_chat(msgs)
    truncated = False
    while len(ids) + reply_room > budget and sum(m["role"] != "system" for m in msgs) > 1:
        drop = next(i for i, m in enumerate(msgs) if m["role"] != "system")
        del msgs[drop]
        ids = backend.render_chat(msgs)
        truncated = True
    if len(ids) + reply_room > budget:
        last = msgs[-1]
        excess = len(ids) + reply_room - budget
        content_ids = backend.tokenize(last["content"])
        keep = max(1, len(content_ids) - excess)
        msgs[-1] = {**last, "content": backend.detokenize(content_ids[:keep]).rstrip("\ufffd")}
        ids = backend.render_chat(msgs)
        truncated = True
    room = budget - len(ids)
    if room < 1:
        raise InvalidInputError("the system prompt alone does not fit the context window", param="messages")
    if sampling.max_tokens > room:
        sampling = sampling.updated(max_tokens=room)
    return ids, sampling, truncated


def plan_chat(backend: "Backend", request: ChatRequest) -> "Generation":
    """The engine's :class:`~allinone.engine.Generation` for a chat request (runs on the worker);
    ``info`` is whether the conversation had to be cut to fit."""
    from ..engine import Generation

    ids, sampling, truncated = prepare_chat(backend, request)
    return Generation(ids, sampling, info=truncated)


def chat_chunks(stream: "GenerationStream") -> Iterator[ChatChunk]:
    """Reply chunks from the engine's stream; the last one has the finish reason and usage.
    Closing this iterator cancels the reply."""
    try:
        for delta in stream:
            if delta.finish_reason is None:
                yield ChatChunk(delta.text)
            else:
                plan = stream.plan
                usage = Usage(prompt_tokens=len(plan.prompt_ids), completion_tokens=delta.completion_tokens)
                yield ChatChunk(delta.text, finish_reason=delta.finish_reason, usage=usage, truncated=bool(plan.info))
    finally:
        stream.close()

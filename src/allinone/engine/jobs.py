"""The engine's jobs: plain data in, plain data out.

A task (or any caller) describes what to compute as one of these jobs and hands it to
:class:`~allinone.engine.Engine`; the engine renders, fits and tokenizes the prompt through the
backend on its worker thread, schedules the job with every other job waiting, and hands back
the output. Nobody but the engine touches the backend.

* :class:`TokenizeJob` -> ``list[int]``
* :class:`ScoreJob` -> :class:`ScoreOutput` (log-probs of label continuations after a prompt)
* :class:`GenerateJob` -> a stream of :class:`~allinone.types.TextDelta` (and a
  :class:`PromptInfo` once the prompt is fitted)
* :class:`EncodeJob` -> :class:`EncodeOutput` (hidden states of the prompt)

Prompts are :class:`Prompt` values: chat messages rendered with the model's own template (or a
raw string), with an optional input text put at :data:`TEXT_SLOT`. The text is the part the
engine may cut to fit the context window; a prompt without a text slot is a conversation, whose
oldest turns are dropped first (see :mod:`.prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import InvalidInputError
from ..types import Message, SamplingParams

#: where a prompt's input text goes (a private-use character pair no task template contains)
TEXT_SLOT = "\ue010TEXT\ue011"

Pooling = Literal["last", "mean", "tokens"]


@dataclass(frozen=True)
class Prompt:
    """What the model reads.

    Attributes:
        messages: chat messages, rendered with the model's chat template (``add_generation_prompt``
            appends the assistant turn's opening). Contents are tokenized as plain text: a user
            cannot type a control token.
        raw: instead of ``messages``, a plain string tokenized as it is (no chat template).
        text: the input text, put wherever :data:`TEXT_SLOT` occurs in the contents (or in
            ``raw``); cut, keeping its start, to ``max_text_tokens`` and to what the context
            window leaves.
        max_text_tokens: the text's token budget (``None``: only the context window limits it).
        add_generation_prompt: end with the opening of the assistant's turn.
        reply_prefix: conversations only: the reply's first words, already written; the
            assistant's turn is opened with them and the model continues from there. The reply
            returned starts with them and counts their tokens (``max_tokens``, stop strings and
            usage apply to them as to sampled tokens).
        split_chars: tokenize every CJK character of the text on its own (other text as usual),
            so a tagger can give each character of Chinese text its own tag.
        natural_copies: with ``split_chars``, only the text's last copy is split; earlier copies
            are tokenized as usual, so the split copy reads a first copy in the tokens the model
            was trained on (on the MSRA pool a tagger over such a copy beat one over two split
            copies, held-out F1 0.682 vs 0.600: docs/evaluation.md).
    """

    messages: tuple[Message, ...] = ()
    raw: str | None = None
    text: str | None = None
    max_text_tokens: int | None = None
    add_generation_prompt: bool = True
    split_chars: bool = False
    natural_copies: bool = False
    reply_prefix: str = ""
    #: conversations: when it does not fit, drop the oldest turns, then cut the last message
    #: (``True``); or keep it whole, the reply getting the room left, and refuse one that
    #: leaves none with :class:`~allinone.errors.ContextLengthError` (``False``)
    cut: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))
        if (self.raw is None) == (not self.messages):
            raise ValueError("a Prompt has either messages or raw")
        if self.text is not None:
            holder = self.raw if self.raw is not None else "".join(str(m.get("content", "")) for m in self.messages)
            if TEXT_SLOT not in holder:
                raise ValueError("a Prompt with text needs TEXT_SLOT in its messages or raw string")


@dataclass(frozen=True)
class PromptInfo:
    """How a prompt was fitted: its length in tokens, whether anything was cut, and the input
    text as the model saw it (a prefix of the text when cut; ``None`` without a text slot)."""

    prompt_tokens: int
    truncated: bool
    text: str | None = None


@dataclass(frozen=True)
class TokenizeJob:
    """Token ids of ``text`` as plain text (control-token strings are not parsed)."""

    text: str


@dataclass(frozen=True)
class ScoreJob:
    """Score label continuations after a prompt (how classification works).

    Attributes:
        prompt: the prompt; the continuations follow its last token.
        continuations: the answers to score (e.g. ``("positive", "Positive", "negative", ...)``);
            several tokens each are scored token by token.
        layers: also return the hidden states of the prompt's last token at these layers (see
            :class:`EncodeJob`), from the same forward pass.
    """

    prompt: Prompt
    continuations: tuple[str, ...]
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.continuations or any(not isinstance(c, str) or not c for c in self.continuations):
            raise InvalidInputError("a score job needs non-empty continuations")


@dataclass(frozen=True)
class ScoreOutput:
    """Log-probabilities (natural log, summed over tokens) of each continuation after the
    prompt, normalized over the whole vocabulary (so their probabilities sum to at most 1).
    ``hidden``: (len(layers), hidden size) float32 when the job asked for layers."""

    logprobs: tuple[float, ...]
    info: PromptInfo
    hidden: np.ndarray | None = None


@dataclass(frozen=True)
class GenerateJob:
    """Generate a reply after the prompt, token by token.

    Attributes:
        prompt: the prompt (a text slot for tasks, or a conversation).
        sampling: decoding parameters; ``max_tokens`` is lowered to what the context leaves.
        json_schema: constrain the reply to this JSON schema (the subset of
            :mod:`allinone.tasks.schema`).
        written_only: the reply is the prompt's ``reply_prefix`` alone, ended with finish
            reason ``stop``: no token is sampled and the prompt is not computed (its tokens are
            still counted in the usage).
    """

    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    json_schema: dict | None = None
    written_only: bool = False


@dataclass(frozen=True)
class EncodeJob:
    """Hidden states of a prompt: what learned task heads read.

    Attributes:
        prompt: the prompt.
        layers: which layers' outputs, 1 .. n_layer (the state after that many transformer
            blocks; n_layer is the model's final, normalized output), or negative counted from
            the end (-1 = the final output).
        pooling: ``last``: the prompt's last token; ``mean``: the mean over the input text's
            tokens (the last occurrence of the text slot); ``tokens``: every token of the input
            text's last occurrence, with its character offsets into the text. Reading the last
            occurrence lets a prompt hold the text twice and read the second copy, whose tokens
            have seen the whole text ("echo embeddings", Springer et al. 2024, "Repetition
            Improves Language Model Embeddings").
    """

    prompt: Prompt
    layers: tuple[int, ...] = (-1,)
    pooling: Pooling = "last"

    def __post_init__(self) -> None:
        if not self.layers or any(isinstance(x, bool) or not isinstance(x, int) or x == 0 for x in self.layers):
            raise InvalidInputError("layers must be non-zero integers (1 .. n_layer, or negative from the end)")
        if self.pooling not in ("last", "mean", "tokens"):
            raise InvalidInputError("pooling must be last, mean or tokens")
        if self.pooling != "last" and self.prompt.text is None:
            raise InvalidInputError(f"pooling={self.pooling!r} needs a prompt with a text")


@dataclass(frozen=True)
class EncodeOutput:
    """Hidden states, float32.

    Attributes:
        states: (len(layers), hidden size) for ``last``/``mean``; (len(layers), n_tokens, hidden
            size) for ``tokens``.
        offsets: ``tokens`` only: per token, ``(start, end)`` character offsets into
            ``info.text`` (a token that holds part of a multi-byte character covers the whole
            character; such neighbours share it).
        token_ids: ``tokens`` only: the text's token ids.
        info: how the prompt was fitted.
    """

    states: np.ndarray
    info: PromptInfo
    offsets: tuple[tuple[int, int], ...] = ()
    token_ids: tuple[int, ...] = ()


Job = TokenizeJob | ScoreJob | GenerateJob | EncodeJob

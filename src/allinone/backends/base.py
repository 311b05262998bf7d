"""The narrow backend interface every inference engine implements.

A backend owns one loaded model and offers a handful of operations (see DESIGN.md):
tokenization, the model's chat template, ``score`` (log-probs of short continuations after a
shared prefix: how classification works) and ``generate`` (a stream of sampled token ids).
Stopping rules, stop strings, UTF-8-safe streaming and finish reasons are shared and live in
:func:`stream_text` so both backends behave the same.

A backend is not thread-safe: the engine owns it and calls it from one thread at a time.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from ..errors import InvalidInputError
from .chat_template import ChatTemplate, Message


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters, validated on construction.

    Args:
        temperature: softmax temperature; 0 means greedy (argmax) decoding.
        top_p: nucleus sampling mass in (0, 1] (Holtzman et al. 2020).
        top_k: keep only the k most likely tokens; 0 disables.
        max_tokens: at most this many new tokens (>= 1).
        seed: makes sampling reproducible for the same prompt and backend.
        stop: strings that end the reply; the stop string itself is not returned.
        repetition_penalty: CTRL-style penalty (Keskar et al. 2019) on tokens already present;
            1.0 disables.

    Raises:
        InvalidInputError: a value is out of range.
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.05

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"{param} {why}", param=param)

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise bad("temperature", "must be a finite number")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if not 0.5 <= self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"must be between 0.5 and 2, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be up to 4 non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def updated(self, **changes: object) -> "SamplingParams":
        """A copy with ``changes`` applied (``None`` values are ignored) and validated."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class TextDelta:
    """A piece of decoded text from :func:`stream_text`; the last one carries the finish reason."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


class Backend(abc.ABC):
    """One loaded model. Subclasses implement the abstract methods below."""

    #: backend name: "llamacpp" or "transformers"
    name: str
    #: a display id of the loaded model
    model_id: str
    #: the context window in tokens (prompt + completion)
    n_ctx: int
    #: ids that end generation (Qwen: <|im_end|>, <|endoftext|>)
    eos_token_ids: frozenset[int]
    chat_template: ChatTemplate

    # -- tokens -------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``, without BOS. With ``special=False`` (the default, for any
        user text) control-token strings such as ``<|im_start|>`` stay plain text."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are rendered as their text. Incomplete UTF-8 at the
        end comes out as U+FFFD (see :func:`stream_text` for streaming)."""

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own chat template.

        Message contents are tokenized as plain text, so a user cannot inject control tokens.
        """
        return self.chat_template.render_ids(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize_text=lambda s: self.tokenize(s, special=False),
            tokenize_template=lambda s: self.tokenize(s, special=True),
        )

    # -- compute ------------------------------------------------------------------------
    @abc.abstractmethod
    def score(self, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Log-probability (natural log, summed over tokens) of each continuation after the prefix.

        Args:
            prefix_ids: the shared prompt, length P >= 1.
            continuations: C non-empty token-id lists (labels); multi-token ones are scored
                token by token, each token conditioned on the prefix and its own earlier tokens.

        Returns:
            C floats, ``log p(continuation | prefix)``.
        """

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                 json_schema: dict | None = None) -> Iterator[int]:
        """Sample token ids one at a time after ``prompt_ids``.

        The stream is open-ended: it yields end tokens too and only returns on its own when the
        context window is full. :func:`stream_text` applies ``max_tokens``, end tokens and stop
        strings; closing the generator stops the work.

        With ``json_schema`` (the subset of :mod:`allinone.tasks.schema`, compact JSON without
        free whitespace where the decoder allows), only tokens that keep the output a prefix of
        a JSON document valid under the schema can be sampled, and an end token only once it is
        complete. Cut off by ``max_tokens``, the text is still such a prefix.
        """

    def close(self) -> None:  # pragma: no cover - trivial
        """Release the model's memory."""


def stream_text(backend: Backend, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                json_schema: dict | None = None) -> Iterator[TextDelta]:
    """Generate a reply and yield it as UTF-8-safe text deltas, ending with the finish reason.

    ``json_schema`` constrains decoding (see :meth:`Backend.generate`); it is passed on only when
    given, so backends written before it existed keep working for free text.

    Text is only emitted once it decodes without a trailing replacement character, so a
    multi-byte character (CJK, emoji) split across tokens is never cut in half. Stop strings are
    held back until it is certain no stop string starts in the pending text.

    Yields:
        TextDelta pieces; the last has ``finish_reason`` "stop" (end token or stop string) or
        "length" (``max_tokens`` reached or the context window full) and the token count.
    """
    ids: list[int] = []
    emitted = 0  # characters of the decoded text already yielded
    finish = "length"
    if json_schema is None:
        gen = backend.generate(prompt_ids, sampling)
    else:
        gen = backend.generate(prompt_ids, sampling, json_schema=json_schema)
    holdback = max((len(s) for s in sampling.stop), default=1) - 1
    text = ""
    try:
        for tok in gen:
            if tok in backend.eos_token_ids:
                finish = "stop"
                break
            ids.append(tok)
            text = backend.detokenize(ids)
            if sampling.stop:
                cut = _find_stop(text, sampling.stop, start=max(0, emitted - holdback))
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
                    break
            if len(ids) >= sampling.max_tokens:
                break
            safe = len(text)
            while safe > emitted and text[safe - 1] == "\ufffd":
                safe -= 1
            safe -= holdback if sampling.stop else 0
            if safe > emitted:
                yield TextDelta(text[emitted:safe], token_ids=list(ids))
                emitted = safe
    finally:
        gen.close()
    tail = text[emitted:]
    if finish == "length":
        # max_tokens may cut a multi-byte character in half: drop the partial character.
        tail = tail.rstrip("\ufffd")
    yield TextDelta(tail, finish_reason=finish, completion_tokens=len(ids), token_ids=list(ids))


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None

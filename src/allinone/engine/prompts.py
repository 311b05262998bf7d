"""Fitting a :class:`~allinone.engine.jobs.Prompt` into the context window (on the engine's worker).

Two rules, one per kind of prompt:

* **a prompt with an input text** (a task): everything but the text is fixed; the text is cut,
  keeping its start, to ``max_text_tokens`` and to what the window leaves after the fixed part
  and the room reserved for the answer. The text's token ids are spliced in as they are (never
  re-tokenized), so its positions in the prompt are known exactly.
* **a conversation** (no text slot): the oldest non-system turns are dropped first, then the
  start of the last remaining message is kept; the system prompt always stays.

Either way the result says ``truncated`` when anything was cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ContextLengthError, InvalidInputError
from .jobs import TEXT_SLOT, Prompt, PromptInfo

if TYPE_CHECKING:
    from ..backends.base import Backend


@dataclass
class Fitted:
    """A fitted prompt: its ids, how it was fitted, where its text's last copy lies
    (``text_span``: token positions ``[start, end)``, ``None`` without a text) and how many of
    its first tokens do not depend on the text (``fixed``: the tokens before the text's first
    copy; ``None`` without a text, a conversation, which a later turn may continue)."""

    ids: list[int]
    info: PromptInfo
    text_ids: list[int]
    text_span: tuple[int, int] | None = None
    fixed: int | None = None


def fit_prompt(backend: "Backend", prompt: Prompt, *, reserve: int, share: bool = False) -> Fitted:
    """Token ids of ``prompt`` that leave ``reserve`` positions free in the context window.

    Args:
        reserve: positions to keep free after the prompt (the answer or the label tokens).
        share: the reserve is a wish, not a need (a reply's ``max_tokens``): it is capped at half
            of what the fixed part of the prompt leaves, so a long prompt is cut only so far.

    Raises:
        InvalidInputError: the prompt does not fit even with its text or history cut.
    """
    if prompt.text is not None:
        return _fit_text(backend, prompt, reserve, share)
    return _fit_conversation(backend, prompt, reserve, share)


def _render(backend: "Backend", prompt: Prompt, text_ids: list[int],
            earlier_ids: list[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """The prompt's ids with ``text_ids`` at the last text slot and ``earlier_ids`` (default: the
    same ids) at every other, and the slots' token spans."""
    spans: list[tuple[int, int]] = []
    n_slots = (prompt.raw if prompt.raw is not None else "".join(str(m.get("content", "")) for m in prompt.messages)
               ).count(TEXT_SLOT)

    def pieces(s: str) -> list[int]:
        ids: list[int] = []
        parts = s.split(TEXT_SLOT)
        for k, part in enumerate(parts):
            if part:
                ids += backend.tokenize(part)
            if k < len(parts) - 1:
                copy = text_ids if earlier_ids is None or len(spans) == n_slots - 1 else earlier_ids
                spans.append((len(ids), len(ids) + len(copy)))
                ids += copy
        return ids

    if prompt.raw is not None:
        bos = backend.bos_ids
        ids = pieces(prompt.raw)
        return bos + ids, [(a + len(bos), b + len(bos)) for a, b in spans]
    starts: list[int] = []
    local: list[list[tuple[int, int]]] = []

    def content(s: str) -> list[int]:
        before = len(spans)
        ids = pieces(s)
        local.append(spans[before:])
        return ids

    ids = backend.render_chat(list(prompt.messages), add_generation_prompt=prompt.add_generation_prompt,
                              tokenize_text=content, content_starts=starts)
    if prompt.text is not None and len(starts) != len(local):  # pragma: no cover - templates that rewrite contents
        raise InvalidInputError("this model's chat template rewrites message contents; the input text "
                                "cannot be located in the prompt")
    found = [(start + a, start + b) for start, group in zip(starts, local) for a, b in group]
    return ids, found


def _fit_text(backend: "Backend", prompt: Prompt, reserve: int, share: bool) -> Fitted:
    fixed, spans = _render(backend, prompt, [])
    copies = max(1, len(spans))
    room = backend.n_ctx - 1 - len(fixed)
    keep = min(reserve, max(1, room // 2)) if share else reserve
    budget = (room - keep) // copies
    if prompt.max_text_tokens is not None:
        budget = min(budget, prompt.max_text_tokens)
    if budget < 1:
        raise InvalidInputError(
            f"the fixed part of this prompt ({len(fixed)} tokens) leaves no room for the text in the context "
            f"window of {backend.n_ctx} tokens", param="text")
    text_ids = split_cjk(backend, prompt.text) if prompt.split_chars else backend.tokenize(prompt.text)
    truncated = len(text_ids) > budget
    if truncated:
        text_ids = text_ids[:budget]
        # never end inside a multi-byte character: drop the tokens of a partial one
        while text_ids and backend.detokenize(text_ids).endswith("\ufffd") and not prompt.text.startswith(
                backend.detokenize(text_ids)):
            text_ids.pop()
    text = backend.detokenize(text_ids) if truncated else prompt.text
    earlier = backend.tokenize(text) if prompt.split_chars and prompt.natural_copies else None
    ids, spans = _render(backend, prompt, text_ids, earlier)
    return Fitted(ids, PromptInfo(len(ids), truncated, text), text_ids, spans[-1] if spans else None,
                  spans[0][0] if spans else len(ids))


def _fit_conversation(backend: "Backend", prompt: Prompt, reserve: int, share: bool) -> Fitted:
    if prompt.raw is not None:
        ids, _ = _render(backend, prompt, [])
        if len(ids) + (min(reserve, 1) if share else reserve) > backend.n_ctx - 1:
            raise InvalidInputError(f"prompt of {len(ids)} tokens does not fit the context of {backend.n_ctx}")
        return Fitted(ids, PromptInfo(len(ids), False), [])
    msgs = [dict(m) for m in prompt.messages]
    budget = backend.n_ctx - 1
    keep = min(reserve, budget // 2) if share else reserve

    opened = backend.tokenize(prompt.reply_prefix) if prompt.reply_prefix else []

    def render(ms: Sequence[dict]) -> list[int]:
        return backend.render_chat(ms, add_generation_prompt=prompt.add_generation_prompt) + opened

    ids = render(msgs)
    truncated = False
    if not prompt.cut:  # whole or not at all; the reply gets the room left (max_tokens capped)
        if len(ids) + 1 > budget:
            raise ContextLengthError(f"the conversation is {len(ids)} tokens; the context window is "
                                     f"{backend.n_ctx}: shorten the messages", param="messages")
        return Fitted(ids, PromptInfo(len(ids), False), [])
    while len(ids) + keep > budget and sum(m["role"] != "system" for m in msgs) > 1:
        drop = next(i for i, m in enumerate(msgs) if m["role"] != "system")
        del msgs[drop]
        ids = render(msgs)
        truncated = True
    if len(ids) + keep > budget:
        last = msgs[-1]
        excess = len(ids) + keep - budget
        content_ids = backend.tokenize(str(last.get("content", "")))
        cut = max(1, len(content_ids) - excess)
        msgs[-1] = {**last, "content": backend.detokenize(content_ids[:cut]).rstrip("\ufffd")}
        ids = render(msgs)
        truncated = True
    if budget - len(ids) < 1 or (not share and len(ids) + keep > budget):
        raise InvalidInputError("the system prompt alone does not fit the context window", param="messages")
    return Fitted(ids, PromptInfo(len(ids), truncated), [])


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff00-\uffef\u3000-\u303f]")


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a character :func:`split_cjk` tokenizes on its own."""
    return _CJK.search(text) is not None


def split_cjk(backend: "Backend", text: str) -> list[int]:
    """Token ids of ``text`` with every CJK character (and full-width form) tokenized on its
    own and every other run of text as usual, so no token spans two CJK characters."""
    ids: list[int] = []
    run = ""
    for ch in text:
        if _CJK.match(ch):
            if run:
                ids += backend.tokenize(run)
                run = ""
            ids += backend.tokenize(ch)
        else:
            run += ch
    if run:
        ids += backend.tokenize(run)
    return ids


def token_offsets(backend: "Backend", text: str, ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Character offsets ``(start, end)`` into ``text`` of each token of ``ids``, the tokens of
    ``text`` (or of a prefix of it).

    From each token's bytes (:meth:`Backend.token_bytes`): a token's byte range is mapped to the
    characters it touches, so a token holding part of a multi-byte character (a CJK character
    or an emoji split over several tokens) covers the whole character.
    """
    raw = text.encode("utf-8")
    # byte offset -> index of the character that byte belongs to
    char_of = []
    for i, ch in enumerate(text):
        char_of += [i] * len(ch.encode("utf-8"))
    char_of.append(len(text))
    out = []
    pos = 0
    for piece in backend.token_bytes(ids):
        start, end = pos, min(pos + len(piece), len(raw))
        pos = end
        if end <= start:
            out.append((char_of[min(start, len(raw))], char_of[min(start, len(raw))]))
            continue
        out.append((char_of[start], char_of[end - 1] + 1))
    return tuple(out)

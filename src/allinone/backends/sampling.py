"""Choosing the next token from a row of logits: one implementation for every backend.

Both backends hand their logits to :func:`sample` as a numpy row, so the same request gives the
same decoding rules (and, greedy, the same tokens) on either engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..types import SamplingParams

#: the repetition penalty looks at this many most recent tokens (llama.cpp's default window)
PENALTY_WINDOW = 64


#: DRY ("Don't Repeat Yourself", p-e-w 2024: text-generation-webui PR #5677, llama.cpp's
#: ``--dry-*`` options; the values are the author's recommended ones): a token that would extend
#: a repeat of ``n`` >= :data:`DRY_ALLOWED_LENGTH` tokens of the reply loses
#: ``dry_multiplier * DRY_BASE ** (n - DRY_ALLOWED_LENGTH)`` of logit
DRY_BASE = 1.75
DRY_ALLOWED_LENGTH = 2
#: a repeat does not run across these characters (the original's defaults): a line start or a
#: list marker said again is structure, not a loop
DRY_BREAKERS = ("\n", ":", '"', "*")
#: the exponent is capped so the penalty stays a finite float (llama.cpp caps it too)
DRY_MAX_EXPONENT = 40


def in_code(reply: Sequence[int], token_text: Callable[[int], str]) -> bool:
    """Whether the reply so far ends inside code: an odd number of backticks (an open ```
    fence or an open `inline span`). Code says names again by design: with DRY on there, the
    0.5B model wrote "`random.randint(1, 101)`" in prose about its own ``randint(1, 100)``
    (a BELLE prompt)."""
    return sum(token_text(t).count("`") for t in reply) % 2 == 1


def dry_repeats(reply: Sequence[int], token_text: Callable[[int], str]) -> dict[int, int]:
    """For each token that would continue a repeat in ``reply``, the repeat's length.

    A repeat is an earlier run of ``reply`` equal to its last tokens; the token that followed
    that run would extend it. Runs stop at a breaker token (one whose text holds a character
    of :data:`DRY_BREAKERS`).

    Args:
        reply: the reply's token ids so far (written words included, the prompt not: repeating
            the user's text or code is not a loop).
        token_text: the text of a token id.

    Returns:
        ``{token id: length of the longest repeat it would extend}``.
    """
    def is_breaker(tok: int) -> bool:
        text = token_text(tok)
        return any(ch in text for ch in DRY_BREAKERS)

    n = len(reply)
    if n < 2 or is_breaker(reply[-1]):
        return {}
    ids = np.asarray(reply, dtype=np.int64)
    longest: dict[int, int] = {}
    for i in np.flatnonzero(ids[:-1] == ids[-1]).tolist():
        follow = int(ids[i + 1])
        if is_breaker(follow):
            continue
        length = 1
        while length <= i and ids[i - length] == ids[n - 1 - length] and not is_breaker(int(ids[i - length])):
            length += 1
        longest[follow] = max(length, longest.get(follow, 0))
    return longest


def sample(logits: np.ndarray, sampling: SamplingParams, history: list[int], rng: np.random.Generator,
           allowed: np.ndarray | None = None, *, reply_start: int = 0,
           token_text: Callable[[int], str] | None = None) -> int:
    """Pick the next token id.

    Order: tokens outside ``allowed`` are removed; the CTRL repetition penalty (Keskar et al.
    2019) divides positive / multiplies negative logits of tokens in the last
    :data:`PENALTY_WINDOW` of ``history``; the DRY penalty (:data:`DRY_BASE`, when
    ``sampling.dry_multiplier`` > 0) is subtracted from tokens that would extend a repeat within
    the reply, outside code (:func:`in_code`); then greedy argmax (temperature 0) or
    temperature, top-k and nucleus (top-p, Holtzman et al. 2020) sampling.

    Args:
        logits: float row of shape (n_vocab,); not modified.
        sampling: the decoding parameters.
        history: token ids so far (prompt and reply), for the repetition penalties.
        rng: the request's random generator (seeded from ``sampling.seed``).
        allowed: optional bool mask of shape (n_vocab,) from a grammar; at least one True.
        reply_start: where the reply begins in ``history`` (its written words included), for DRY.
        token_text: the text of a token id (for DRY's breakers and code spans); DRY is off
            without it.

    Returns:
        The token id.
    """
    logits = logits.astype(np.float64)
    if allowed is not None:
        logits = np.where(allowed[: logits.size], logits, -np.inf)
    if sampling.repetition_penalty != 1.0 and history:
        seen = np.fromiter(set(history[-PENALTY_WINDOW:]), dtype=np.int64)
        seen = seen[seen < logits.size]
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / sampling.repetition_penalty, vals * sampling.repetition_penalty)
    if sampling.dry_multiplier > 0 and token_text is not None:
        reply = history[reply_start:]  # copied only when DRY is on: every decode step comes here
        for tok, length in ({} if in_code(reply, token_text) else dry_repeats(reply, token_text)).items():
            if length >= DRY_ALLOWED_LENGTH and tok < logits.size:
                logits[tok] -= sampling.dry_multiplier * DRY_BASE ** min(length - DRY_ALLOWED_LENGTH, DRY_MAX_EXPONENT)
    if sampling.greedy:
        return int(np.argmax(logits))
    # top-k first: the rest of the work is then on k values instead of the whole vocabulary
    k = sampling.top_k if sampling.top_k and sampling.top_k < logits.size else logits.size
    idx = np.argpartition(logits, -k)[-k:] if k < logits.size else np.arange(logits.size)
    vals = logits[idx] / sampling.temperature
    order = np.argsort(-vals, kind="stable")
    idx, vals = idx[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = np.cumsum(probs) - probs < sampling.top_p
        keep[0] = True  # top_p 0 keeps the most likely token only
        idx, probs = idx[keep], probs[keep]
        probs /= probs.sum()
    return int(idx[rng.choice(probs.size, p=probs)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities of a logits row (float64)."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - np.log(np.exp(shifted).sum())

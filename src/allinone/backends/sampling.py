"""Choosing the next token from a row of logits: one implementation for every backend.

Both backends hand their logits to :func:`sample` as a numpy row, so the same request gives the
same decoding rules (and, greedy, the same tokens) on either engine.
"""

from __future__ import annotations

import numpy as np

from ..types import SamplingParams

#: the repetition penalty looks at this many most recent tokens (llama.cpp's default window)
PENALTY_WINDOW = 64


def sample(logits: np.ndarray, sampling: SamplingParams, history: list[int], rng: np.random.Generator,
           allowed: np.ndarray | None = None) -> int:
    """Pick the next token id.

    Order: tokens outside ``allowed`` are removed; the CTRL repetition penalty (Keskar et al.
    2019) divides positive / multiplies negative logits of tokens in the last
    :data:`PENALTY_WINDOW` of ``history``; then greedy argmax (temperature 0) or temperature,
    top-k and nucleus (top-p, Holtzman et al. 2020) sampling.

    Args:
        logits: float row of shape (n_vocab,); not modified.
        sampling: the decoding parameters.
        history: token ids so far (prompt and reply), for the repetition penalty.
        rng: the request's random generator (seeded from ``sampling.seed``).
        allowed: optional bool mask of shape (n_vocab,) from a grammar; at least one True.

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

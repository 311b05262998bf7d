"""Token tagging for span tasks: BIO tags, their alignment with character spans, and a
valid-sequence decode.

A span task (NER) is learned as a tag per token of the text: ``B-X`` opens a span of type X,
``I-X`` continues it, ``O`` is outside any (the BIO / IOB2 scheme of the CoNLL-2003 data,
Tjong Kim Sang & De Meulder 2003). A head gives each token log-probabilities over the tags; the
decode is the most probable tag sequence in which ``I-X`` only follows ``B-X`` or ``I-X``
(Viterbi over the allowed transitions, as a CRF's decode is), so every span is well formed.
Spans map back to exact character offsets through each token's character range (from the
tokenizer's bytes), trimmed of surrounding white space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bio_tags(types: Sequence[str]) -> list[str]:
    """``["O", "B-T1", "I-T1", "B-T2", ...]``."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def token_tags(text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int, str]],
               tags: Sequence[str]) -> list[int]:
    """The tag index of every token given the gold ``spans`` (start, end, type).

    A token is part of a span when its characters, without white space, overlap the span; the
    span's first such token is ``B``, the others ``I``. Tokens of white space only are ``O``.
    """
    index = {t: i for i, t in enumerate(tags)}
    out = [0] * len(offsets)
    for start, end, kind in spans:
        first = True
        for k, (a, b) in enumerate(offsets):
            a, b = _trim(text, a, b)
            if a < b and a < end and b > start:
                out[k] = index[("B-" if first else "I-") + kind]
                first = False
    return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def allowed_transitions(tags: Sequence[str]) -> np.ndarray:
    """(T, T) bool: ``[i, j]`` is whether tag ``j`` may follow tag ``i``; row ``-1`` semantics for
    the start are given by :func:`allowed_starts`."""
    n = len(tags)
    out = np.ones((n, n), dtype=bool)
    for j, tag in enumerate(tags):
        if tag.startswith("I-"):
            kind = tag[2:]
            out[:, j] = [t in (f"B-{kind}", f"I-{kind}") for t in tags]
    return out


def allowed_starts(tags: Sequence[str]) -> np.ndarray:
    return np.array([not t.startswith("I-") for t in tags])


def viterbi(logp: np.ndarray, tags: Sequence[str]) -> list[int]:
    """The most probable valid tag sequence for per-token log-probabilities (n, T)."""
    n = len(logp)
    if n == 0:
        return []
    trans = np.where(allowed_transitions(tags), 0.0, -np.inf)
    score = np.where(allowed_starts(tags), logp[0], -np.inf)
    back = np.zeros((n, len(tags)), dtype=np.int64)
    for k in range(1, n):
        cand = score[:, None] + trans  # (from, to)
        back[k] = np.argmax(cand, axis=0)
        score = cand[back[k], np.arange(len(tags))] + logp[k]
    path = [int(np.argmax(score))]
    for k in range(n - 1, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1]


def spans_from_tags(text: str, offsets: Sequence[tuple[int, int]], path: Sequence[int],
                    tags: Sequence[str]) -> list[tuple[int, int, str]]:
    """Character spans (start, end, type) of a tag sequence, trimmed of white space; tokens
    sharing a character (parts of one multi-byte character) join the same span."""
    spans: list[list] = []
    for (a, b), t in zip(offsets, path):
        tag = tags[t]
        a, b = _trim(text, a, b)
        if tag == "O" or a >= b:
            if tag == "O":
                spans.append(None)
            continue
        kind = tag[2:]
        current = spans[-1] if spans else None
        if tag.startswith("I-") and current is not None and current[2] == kind:
            current[1] = max(current[1], b)
        else:
            spans.append([a, b, kind])
    out = []
    for s in spans:
        if s is not None and (not out or out[-1][1] <= s[0]):
            out.append((s[0], s[1], s[2]))
    return out


def span_scores(gold: Sequence[Sequence[tuple[int, int, str]]],
                pred: Sequence[Sequence[tuple[int, int, str]]]) -> dict[str, float]:
    """Exact-span micro precision, recall and F1 (start, end and type all equal), as the
    evaluation scores NER."""
    tp = sum(len(set(g) & set(p)) for g, p in zip(gold, pred))
    n_pred = sum(len(set(p)) for p in pred)
    n_gold = sum(len(set(g)) for g in gold)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}

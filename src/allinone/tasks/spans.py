"""Spans of the input text: mapping answered span texts to exact character offsets."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpanConfig:
    """Where spans live in a task's output: the array ``field`` of objects with ``text_key``
    (the span's text) and ``type_key`` (its type)."""

    field: str
    text_key: str
    type_key: str


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _is_word(ch: str) -> bool:
    return ch.isalnum() and not _is_cjk(ch)


def _occurrences(text: str, needle: str, haystack: str) -> list[tuple[int, int]]:
    """Every non-overlapping occurrence of ``needle`` in ``haystack`` (``text`` folded or not)
    that does not cut a word of a space-delimited script in half."""
    out = []
    n = len(needle)
    i = haystack.find(needle)
    while i >= 0:
        j = i + n
        left_ok = i == 0 or not (_is_word(text[i - 1]) and _is_word(text[i]))
        right_ok = j == len(text) or not (_is_word(text[j - 1]) and _is_word(text[j]))
        if left_ok and right_ok:
            out.append((i, j))
            i = haystack.find(needle, j)
        else:
            i = haystack.find(needle, i + 1)
    return out


def has_letter(span: str) -> bool:
    """Whether ``span`` can be a name: a span without any letter (a score, a date, a number,
    punctuation) never is (no entity of the CoNLL-2003 and MSRA evaluation files is one)."""
    return any(ch.isalpha() for ch in span)


def whole_words(text: str, spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """``spans`` (start, end, type), sorted by start, each widened to the whole words of a
    space-delimited script it cuts (a tagger tags tokens, and a token can end inside a word:
    "Cy" of "Cyberspace"); a span that then overlaps the one before it, or holds no letter
    (:func:`has_letter`), is dropped. CJK text has no word boundaries to respect and is left as
    it is."""
    out: list[tuple[int, int, str]] = []
    for a, b, kind in spans:
        while 0 < a < len(text) and _is_word(text[a - 1]) and _is_word(text[a]):
            a -= 1
        while 0 < b < len(text) and _is_word(text[b - 1]) and _is_word(text[b]):
            b += 1
        if (not out or out[-1][1] <= a) and has_letter(text[a:b]):
            out.append((a, b, kind))
    return out


def locate_spans(text: str, items: list[dict[str, Any]], spans: SpanConfig) -> tuple[list[dict[str, Any]], int]:
    """Give each answered span its character offsets in ``text``.

    Policy: a span without any letter (a score, a date, a number) is not a name and is dropped.
    A span's text is looked up exactly, and if absent case-insensitively (the offsets then
    carry the input's own spelling); it is mapped to **all** its non-overlapping occurrences that
    respect word boundaries (a name repeated in a sentence is nearly always the same entity, and
    exact-span scoring counts every mention). Repeated (text, type) answers count once. Spans that
    do not occur are dropped and counted. Where found spans overlap, the longer one is kept (then
    the earlier). The result is sorted by ``start``.

    Returns:
        (spans with ``start``/``end``, number dropped: not in the input, or no letter in it).
    """
    dropped = 0
    seen: set[tuple[str, str]] = set()
    found: list[dict[str, Any]] = []
    folded = text.casefold() if len(text.casefold()) == len(text) else None
    for item in items:
        needle = str(item.get(spans.text_key, "")).strip()
        kind = item.get(spans.type_key)
        if (needle, kind) in seen:
            continue
        seen.add((needle, kind))
        if not has_letter(needle):
            dropped += 1
            continue
        occ = _occurrences(text, needle, text)
        if not occ and needle and folded is not None and len(needle.casefold()) == len(needle):
            occ = _occurrences(text, needle.casefold(), folded)
        if not occ:
            dropped += 1
            continue
        for start, end in occ:
            found.append({**item, spans.text_key: text[start:end], "start": start, "end": end})
    kept: list[dict[str, Any]] = []
    for span in sorted(found, key=lambda s: (-(s["end"] - s["start"]), s["start"])):
        if all(span["end"] <= k["start"] or span["start"] >= k["end"] for k in kept):
            kept.append(span)
    kept.sort(key=lambda s: (s["start"], s["end"]))
    return kept, dropped

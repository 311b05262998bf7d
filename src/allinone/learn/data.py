"""Training rows: read and checked before anything is computed, every problem naming the file
and the line.

Same format as the evaluation files: JSON Lines, one object per line, with ``text`` and
``label`` (classify tasks) or ``text`` and ``entities`` (span tasks: ``{"text", "type",
"start", "end"}`` with ``text[start:end] == entity["text"]``, ``end`` exclusive).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainingDataError

#: the fewest rows of each label a classify task is fit from (fewer cannot be cross-validated
#: in 5 folds with a row of the label in each)
MIN_ROWS_PER_LABEL = 8


@dataclass(frozen=True)
class TrainingData:
    """Checked rows from one or more files: texts, with labels (classify) or spans
    ``(start, end, type)`` (span tasks); ``files`` is (path, SHA-256, rows) per file."""

    files: tuple[tuple[Path, str, int], ...]
    texts: list[str]
    labels: list[str] = field(default_factory=list)
    spans: list[list[tuple[int, int, str]]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": ", ".join(p.name for p, _, _ in self.files), "rows": len(self.texts),
                               "files": [{"file": p.name, "sha256": sha, "rows": n} for p, sha, n in self.files]}
        if self.labels:
            out["labels"] = dict(sorted(Counter(self.labels).items()))
        if self.spans:
            out["spans"] = dict(sorted(Counter(t for row in self.spans for _, _, t in row).items()))
        return out


def _paths(path: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]


#: a row limit: one for every file, one per file (in the files' order), or none
Limit = int | Sequence[int] | None


def _limits(paths: Sequence[Path], limit: Limit) -> list[int | None]:
    if limit is None or isinstance(limit, int):
        limit = [limit] * len(paths)
    limits = list(limit)
    for n in limits:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise TrainingDataError(f"a row limit must be an integer >= 1, got {n!r}")
    if len(limits) == 1:
        return limits * len(paths)
    if len(limits) != len(paths):
        raise TrainingDataError(f"{len(limits)} row limits for {len(paths)} files: give one, or one per file")
    return limits


def _rows(path: Path, limit: int | None) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise TrainingDataError(f"no such training file: {path}")
    out = []
    try:
        with path.open(encoding="utf-8-sig") as fh:  # a BOM, as spreadsheet exports write, is not data
            for lineno, line in enumerate(fh, 1):
                if limit is not None and len(out) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingDataError(f"{path}:{lineno}: not a JSON line ({exc.msg}); the training data "
                                            "must be JSONL, one object per line") from None
                if not isinstance(row, dict):
                    raise TrainingDataError(f"{path}:{lineno}: each line must be a JSON object")
                text = row.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise TrainingDataError(f"{path}:{lineno}: 'text' must be a non-empty string")
                out.append((lineno, row))
    except UnicodeDecodeError:
        raise TrainingDataError(f"{path}: not UTF-8 text") from None
    if not out:
        raise TrainingDataError(f"{path} has no rows")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_labelled(path: str | Path | Sequence[str | Path], labels: Sequence[str] | None, *,
                  limit: Limit = None, min_per_label: int = MIN_ROWS_PER_LABEL) -> TrainingData:
    """Rows with ``text`` and ``label``, from one file or several.

    Args:
        labels: the task's label set; ``None``: the labels found in the data.
        limit: only the first ``limit`` rows of each file, or of each file its own number
            (a sequence, in the files' order).

    Raises:
        TrainingDataError: a missing or unknown label, or fewer than ``min_per_label`` rows of
            a label (the message names the file and line, or the label).
    """
    texts, found, files = [], [], []
    paths = _paths(path)
    for p, n in zip(paths, _limits(paths, limit)):
        rows = _rows(p, n)
        for lineno, row in rows:
            label = row.get("label")
            if label is None:
                raise TrainingDataError(f"{p}:{lineno}: missing 'label' (a string)")
            if not isinstance(label, str) or not label:
                raise TrainingDataError(f"{p}:{lineno}: 'label' must be a non-empty string, got {json.dumps(label)}")
            if labels is not None and label not in labels:
                raise TrainingDataError(f"{p}:{lineno}: label {label!r} is not one of the task's labels: "
                                        f"{', '.join(labels)}")
            texts.append(row["text"])
            found.append(label)
        files.append((p, _sha256(p), len(rows)))
    counts = Counter(found)
    wanted = list(labels) if labels is not None else sorted(counts)
    where = ", ".join(str(p) for p, _, _ in files)
    if len(wanted) < 2:
        raise TrainingDataError(f"{where}: needs rows of at least two labels")
    short = [f"{lab} ({counts.get(lab, 0)})" for lab in wanted if counts.get(lab, 0) < min_per_label]
    if short:
        cut = " (with a row limit: the first rows of each file)" if any(n is not None for n in _limits(paths, limit)) else ""
        raise TrainingDataError(f"{where}: every label needs at least {min_per_label} rows{cut}; "
                                f"too few: {', '.join(short)}")
    return TrainingData(tuple(files), texts, labels=found)


def load_spans(path: str | Path | Sequence[str | Path], types: Sequence[str], *,
               limit: Limit = None) -> TrainingData:
    """Rows with ``text`` and ``entities``; ``limit`` as for :func:`load_labelled`.

    Raises:
        TrainingDataError: an entity whose offsets do not match its text, an unknown type, two
            overlapping spans of one type, or malformed entities (naming the file and line).
    """
    texts, spans, files = [], [], []
    paths = _paths(path)
    for p, n in zip(paths, _limits(paths, limit)):
        rows = _rows(p, n)
        files.append((p, _sha256(p), len(rows)))
        texts_spans = _check_spans(p, rows, types)
        texts += [t for t, _ in texts_spans]
        spans += [s for _, s in texts_spans]
    return TrainingData(tuple(files), texts, spans=spans)


def _check_spans(path: Path, rows: list[tuple[int, dict[str, Any]]], types: Sequence[str]):
    out = []
    for lineno, row in rows:
        entities = row.get("entities")
        if not isinstance(entities, list):
            raise TrainingDataError(f"{path}:{lineno}: missing 'entities' (a list)")
        text = row["text"]
        found: list[tuple[int, int, str]] = []
        for k, e in enumerate(entities):
            where = f"{path}:{lineno}: entities[{k}]"
            if not isinstance(e, dict) or not all(key in e for key in ("text", "type", "start", "end")):
                raise TrainingDataError(f"{where} needs text, type, start and end")
            start, end, kind = e["start"], e["end"], e["type"]
            if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
                raise TrainingDataError(f"{where}: start and end must be integers, got {start!r} and {end!r}")
            if start >= end:
                raise TrainingDataError(f"{where}: offsets {start}..{end} are not a span (start must be below end)")
            if start < 0 or end > len(text):
                raise TrainingDataError(f"{where}: offsets {start}..{end} are outside the text ({len(text)} characters)")
            if text[start:end] != e["text"]:
                raise TrainingDataError(f"{where}: text[{start}:{end}] is {text[start:end]!r}, not {e['text']!r}")
            if kind not in types:
                raise TrainingDataError(f"{where}: type {kind!r} is not one of the task's types: {', '.join(types)}")
            found.append((start, end, kind))
        found.sort()
        for (a0, a1, at), (b0, b1, bt) in zip(found, found[1:]):
            if b0 < a1:
                same = "of one type " if at == bt else ""
                raise TrainingDataError(f"{path}:{lineno}: spans {a0}..{a1} ({at}) and {b0}..{b1} ({bt}) overlap "
                                        f"{same}(a tagger gives each character one tag)")
        out.append((text, found))
    return out

"""Reading evaluation files: UTF-8 JSON Lines, one example per line (see ../shared/data/README.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError


def load_jsonl(path: str | Path, *, limit: int | None = None, require: tuple[str, ...] = (),
               check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a JSONL file (all when ``None``); blank lines are skipped.

    Args:
        check: says what is wrong with a row (``None``: nothing), for rules beyond ``require``.

    Raises:
        InvalidInputError: missing file, a line that is not a JSON object, a row missing a
            ``require``-d field or failing ``check`` (the message gives the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no such data file: {path}")
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InvalidInputError(f"{path}:{lineno}: each line must be a JSON object")
            missing = [k for k in require if k not in row]
            if missing:
                raise InvalidInputError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            problem = check(row) if check else None
            if problem:
                raise InvalidInputError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows

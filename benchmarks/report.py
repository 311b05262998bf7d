"""One marked section of a markdown report, rewritten in place by the benchmark that owns it."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, section: str, *, title: str = "# Benchmarks") -> None:
    """Put ``section`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``path``, replacing
    what was there; a file without the markers gets them at its end. The rest is left as it is."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    body = f"{begin}\n{section.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text, encoding="utf-8")

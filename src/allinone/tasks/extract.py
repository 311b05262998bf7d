"""Extraction: constrained decoding to a JSON schema, then validation and span offsets.

The backend only samples tokens that keep the output a prefix of a valid document (llama.cpp
grammar or llguidance). What comes back is still checked: a reply cut off at ``max_tokens`` is
closed after its last complete item (:func:`~allinone.tasks.schema.salvage_json`), and if
nothing valid is left the smallest valid value is returned (``repaired=True``). So the data of
an :class:`ExtractResult` always validates against the task's output schema.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.base import SamplingParams, stream_text
from ..errors import InvalidInputError
from ..results import ExtractResult, Usage
from .classify import few_shot_messages, prepare_text, render_text
from .schema import minimal_instance, salvage_json, validate

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..engine import Generation


@dataclass(frozen=True)
class SpanConfig:
    field: str
    text_key: str
    type_key: str


@dataclass(frozen=True)
class ExtractTask:
    """A compiled extraction prompt.

    Attributes:
        name: task name.
        system: the system prompt.
        template: the user message; ``{text}`` is replaced by the input.
        schema: the JSON schema the model's answer is constrained to (subset of :mod:`.schema`).
        examples: few-shot (input text, answer JSON text) pairs.
        spans: when set, items of ``spans.field`` get character offsets into the input.
        dedupe: top-level string-array fields de-duplicated case-insensitively.
        delimiters: strings broken up inside the input (see :func:`.classify.neutralize`).
    """

    name: str
    system: str
    template: str
    schema: dict[str, Any]
    examples: tuple[tuple[str, str], ...] = ()
    spans: SpanConfig | None = None
    dedupe: tuple[str, ...] = ()
    delimiters: tuple[str, ...] = ()

    def messages(self, text: str) -> list[dict[str, str]]:
        return few_shot_messages(self.system, self.examples, self.render, text)

    def render(self, text: str) -> str:
        return render_text(self.template, text, self.delimiters)

    def result_schema(self) -> dict[str, Any]:
        """The schema of ``ExtractResult.data``: the answer schema plus ``start``/``end`` on spans
        (and no ``maxItems`` on the span list: one answer may occur several times)."""
        return result_schema(self.schema, self.spans)


def result_schema(schema: dict[str, Any], spans: SpanConfig | None) -> dict[str, Any]:
    if spans is None:
        return schema
    out = copy.deepcopy(schema)
    arr = out["properties"][spans.field]
    arr.pop("maxItems", None)
    item = arr["items"]
    item["properties"]["start"] = {"type": "integer", "description": "offset of the first character"}
    item["properties"]["end"] = {"type": "integer", "description": "offset after the last character"}
    item["required"] = [*item.get("required", []), "start", "end"]
    return out


def extract(backend: "Backend", task: ExtractTask, text: str, sampling: SamplingParams, *,
            max_input_tokens: int = 1024) -> ExtractResult:
    """Run ``task`` on ``text`` on its own (the engine decodes the same plan together with other
    replies: :func:`plan_extract`, then :func:`extract_result`).

    Raises:
        InvalidInputError: empty text, or the prompt leaves no room to answer.
    """
    plan = plan_extract(backend, task, text, sampling, max_input_tokens=max_input_tokens)
    parts: list[str] = []
    finish, completion = "length", 0
    for delta in stream_text(backend, plan.prompt_ids, plan.sampling, json_schema=plan.json_schema):
        parts.append(delta.text)
        if delta.finish_reason is not None:
            finish, completion = delta.finish_reason, delta.completion_tokens
    return extract_result(task, plan, "".join(parts), finish, completion)


def plan_extract(backend: "Backend", task: ExtractTask, text: str, sampling: SamplingParams, *,
                 max_input_tokens: int = 1024) -> "Generation":
    """The constrained generation for ``text``; ``info`` is (the text the model sees, truncated).

    Raises:
        InvalidInputError: empty text, or the prompt leaves no room to answer.
    """
    from ..engine import Generation

    # The input is cut so that the task's prompt, the input and the answer budget fit together.
    overhead = len(backend.render_chat(task.messages(""), add_generation_prompt=True))
    answer_room = min(sampling.max_tokens, max(1, (backend.n_ctx - overhead) // 2))
    budget = min(max_input_tokens, backend.n_ctx - 1 - overhead - answer_room)
    if budget < 1:
        raise InvalidInputError(
            f"the prompt of task {task.name!r} ({overhead} tokens) leaves no room in the context window "
            f"of {backend.n_ctx} tokens", param="text")
    text, truncated = prepare_text(backend, text, budget)
    ids = backend.render_chat(task.messages(text), add_generation_prompt=True)
    room = backend.n_ctx - 1 - len(ids)
    if room < 1:  # pragma: no cover - the budget above keeps room
        raise InvalidInputError("the prompt does not fit the context window", param="text")
    if sampling.max_tokens > room:
        sampling = sampling.updated(max_tokens=room)
    return Generation(ids, sampling, json_schema=task.schema, info=(text, truncated))


def extract_result(task: ExtractTask, plan: "Generation", raw: str, finish: str, completion: int) -> ExtractResult:
    """Parse, clean (dedupe, span offsets) and validate the constrained answer ``raw``."""
    text, truncated = plan.info
    data, repaired = parse_answer(raw, task.schema)
    dropped = 0
    for name in task.dedupe:
        data = {**data, name: dedupe_strings(data.get(name, []))}
    final_schema = task.result_schema()
    if task.spans is not None:
        # offsets into the text the model saw (a prefix of the input when it was truncated)
        located, dropped = locate_spans(text, data.get(task.spans.field, []), task.spans)
        data = {**data, task.spans.field: located}
    if validate(data, final_schema):  # pragma: no cover - post-processing keeps the shape; belt and braces
        data, repaired = minimal_instance(final_schema), True
    usage = Usage(prompt_tokens=len(plan.prompt_ids), completion_tokens=completion)
    return ExtractResult(data=data, finish_reason=finish, usage=usage, dropped=dropped,
                         truncated=truncated, repaired=repaired)


def parse_answer(raw: str, schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The first valid value among the reply and its cut-back forms; else the smallest valid one.

    Returns:
        (value, repaired) where ``repaired`` is False only if the reply was used as it came.
    """
    for i, candidate in enumerate(salvage_json(raw.strip())):
        if not validate(candidate, schema):
            return candidate, i > 0 or _needed_salvage(raw)
    return minimal_instance(schema), True


def _needed_salvage(raw: str) -> bool:
    try:
        json.loads(raw, strict=False)
        return False
    except ValueError:
        return True


def dedupe_strings(items: list[str]) -> list[str]:
    """Strip, drop empty, and keep the first of case-insensitive duplicates."""
    seen: set[str] = set()
    out = []
    for item in items:
        s = item.strip()
        key = s.casefold()
        if s and key not in seen:
            seen.add(key)
            out.append(s)
    return out


# -- span offsets --------------------------------------------------------------------------
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
        if not any(ch.isalpha() for ch in needle):  # scores, dates, numbers: never a name
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

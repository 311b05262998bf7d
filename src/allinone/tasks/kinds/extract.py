"""``extract``: constrained decoding to a JSON schema, then validation and span offsets.

The backend only samples tokens that keep the output a prefix of a valid document
(llguidance). What comes back is still checked: a reply cut off at ``max_tokens`` is closed
after its last complete item (:func:`~allinone.tasks.schema.salvage_json`), and if nothing valid
is left the smallest valid value is returned (``repaired=True``). So the data of an
:class:`~allinone.results.ExtractResult` always validates against the task's output schema.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...engine import GenerateJob, GenerateOutput
from ...results import ExtractResult, Usage
from ..prompting import TaskPrompt, compile_prompt, fill, pick
from ..schema import SchemaError, check_schema, minimal_instance, salvage_json, validate
from ..spans import SpanConfig, locate_spans
from .base import (
    FINISH_SCHEMA,
    GENERATION_PARAMS,
    USAGE_SCHEMA,
    Limits,
    Request,
    TaskKind,
    named_list,
    resolve_lang,
    sampling_from,
)
from .tagger import Tagger

if TYPE_CHECKING:
    from ...types import Message
    from ..spec import TaskSpec


@dataclass(frozen=True)
class ExtractTask:
    """A compiled extraction task.

    Attributes:
        name: task name.
        prompt: system prompt, template and few-shot (input text, answer JSON text) pairs.
        schema: the JSON schema the model's answer is constrained to (subset of :mod:`..schema`).
        spans: when set, items of ``spans.field`` get character offsets into the input.
        dedupe: top-level string-array fields de-duplicated case-insensitively.
    """

    name: str
    prompt: TaskPrompt
    schema: dict[str, Any]
    spans: SpanConfig | None = None
    dedupe: tuple[str, ...] = ()
    #: the learned token tagger serving this span task, when one applies (:mod:`.tagger`)
    tagger: Tagger | None = None
    #: the span types asked for (a tagger may know more)
    types: tuple[str, ...] = ()

    def result_schema(self) -> dict[str, Any]:
        return result_schema(self.schema, self.spans)


def result_schema(schema: dict[str, Any], spans: SpanConfig | None) -> dict[str, Any]:
    """The schema of ``ExtractResult.data``: the answer schema plus ``start``/``end`` on spans
    (and no ``maxItems`` on the span list: one answer may occur several times)."""
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


def _answer_json(value: Any) -> str:
    # the layout the constrained decoder produces (", " and ": ")
    return json.dumps(value, ensure_ascii=False)


class ExtractKind(TaskKind):
    name = "extract"
    fields = frozenset({"output_schema", "spans", "dedupe"})
    _sampling = ("max_tokens", "temperature", "top_p", "seed")

    def check_spec(self, spec: "TaskSpec") -> None:
        if spec.output_schema is None and spec.spans is None:
            raise ValueError("output_schema: an extract task needs output_schema or spans")
        try:
            schema = check_schema(spec.output_schema if spec.output_schema is not None else spec.spans.schema())
        except SchemaError as exc:
            raise ValueError(str(exc)) from None
        object.__setattr__(spec, "output_schema", schema)  # the derived schema, for everyone after
        if spec.spans is not None:
            field = schema["properties"].get(spec.spans.field, {})
            item = field.get("items", {}) if field.get("type") == "array" else {}
            props = item.get("properties", {}) if item.get("type") == "object" else {}
            if spec.spans.text_key not in props or spec.spans.type_key not in props:
                raise ValueError(
                    f"spans: output_schema must have an array '{spec.spans.field}' of objects with "
                    f"'{spec.spans.text_key}' and '{spec.spans.type_key}'")
        for name in spec.dedupe:
            prop = schema["properties"].get(name, {})
            if prop.get("type") != "array" or prop.get("items", {}).get("type") != "string":
                raise ValueError(f"dedupe: {name!r} is not a top-level array of strings in output_schema")
        for i, ex in enumerate(spec.examples):
            where = f"examples[{i}]"
            if not isinstance(ex.output, dict) or ex.label is not None:
                raise ValueError(f"{where}: an extract example needs 'output' as a table/object")
            errors = validate(ex.output, spec.output_schema)
            if errors:
                raise ValueError(f"{where}.output does not match output_schema: {errors[0]}")

    def params(self, spec: "TaskSpec") -> set[str]:
        out = set(self.common_params) | set(self._sampling)
        if spec.spans is not None:
            out.add("types")
        return out

    def _request(self, spec: "TaskSpec", text: str, params: dict[str, Any], limits: Limits,
                 history: tuple["Message", ...]) -> Request:
        types = None
        if spec.spans is not None:
            if "types" in params:
                types = named_list(params["types"], "types")
            else:
                types = tuple((t, spec.spans.type_descriptions.get(t, "")) for t in spec.spans.types)
        # a penalty on repeated quotes and brackets breaks JSON
        sampling = sampling_from(spec, params, limits, keys=self._sampling, fixed={"repetition_penalty": 1.0})
        return Request(lang=resolve_lang(spec, params, text), types=types,
                       sampling=sampling, max_input_tokens=limits.max_input_tokens)

    def applies(self, artifact: Any, req: Request) -> bool:
        """Whether a learned tagger serves this request: a span task's tagger that knows every
        type asked for."""
        return (artifact is not None and artifact.meta.get("kind") == self.name
                and artifact.meta.get("method") == "tagger" and req.types is not None
                and {n for n, _ in req.types} <= set(artifact.meta.get("types", ())))

    def compile(self, spec: "TaskSpec", req: Request, layout: str = "single",
                artifact: Any = None) -> ExtractTask:
        lang = req.lang
        schema = spec.output_schema
        spans = None
        names: list[str] = []
        descriptions: dict[str, str] = {}
        if spec.spans is not None:
            s = spec.spans
            spans = SpanConfig(s.field, s.text_key, s.type_key)
            names = [n for n, _ in req.types]
            descriptions = {n: d or s.type_descriptions.get(n, "") for n, d in req.types}
            schema = json.loads(json.dumps(schema))
            schema["properties"][s.field]["items"]["properties"][s.type_key] = {"type": "string", "enum": names}
        instructions = fill(pick(spec.instructions, lang), lang, names, descriptions)
        question = fill(pick(spec.question, lang), lang, names, descriptions)
        examples = []
        for ex in spec.examples_for(lang):
            output = ex.output
            if spans is not None:  # keep only spans of the requested types
                items = [i for i in output.get(spans.field, []) if i.get(spans.type_key) in names]
                output = {**output, spans.field: items}
            examples.append((ex.text, _answer_json(output)))
        prompt = compile_prompt(spec, lang, layout, instructions, question, examples)
        tagger = Tagger.from_artifact(artifact) if self.applies(artifact, req) else None
        return ExtractTask(spec.name, prompt, schema, spans, tuple(spec.dedupe), tagger, tuple(names))

    def plan(self, compiled: ExtractTask, text: str, req: Request):
        if compiled.tagger is None:
            return (yield from super().plan(compiled, text, req))
        found, prompt_tokens = yield from compiled.tagger.plan(text)
        cfg = compiled.spans
        items = [{cfg.text_key: text[a:b], cfg.type_key: t, "start": a, "end": b}
                 for a, b, t in found if t in compiled.types]
        return ExtractResult(data={cfg.field: items}, finish_reason="stop",
                             usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=0))

    def jobs(self, compiled: ExtractTask, text: str, req: Request) -> list[GenerateJob]:
        return [GenerateJob(compiled.prompt.prompt(text, max_text_tokens=req.max_input_tokens), req.sampling,
                            json_schema=compiled.schema)]

    def result(self, compiled: ExtractTask, outputs: Sequence[GenerateOutput], req: Request) -> ExtractResult:
        out = outputs[0]
        data, repaired = parse_answer(out.text, compiled.schema)
        dropped = 0
        for name in compiled.dedupe:
            data = {**data, name: dedupe_strings(data.get(name, []))}
        final_schema = compiled.result_schema()
        if compiled.spans is not None:
            # offsets into the text the model saw (a prefix of the input when it was truncated)
            seen = out.info.text or ""
            if "{text_json}" in compiled.prompt.template:
                seen = json.loads(f'"{seen}"') if _json_string(seen) else seen
            located, dropped = locate_spans(seen, data.get(compiled.spans.field, []), compiled.spans)
            data = {**data, compiled.spans.field: located}
        if validate(data, final_schema):  # pragma: no cover - post-processing keeps the shape; belt and braces
            data, repaired = minimal_instance(final_schema), True
        usage = Usage(prompt_tokens=out.info.prompt_tokens, completion_tokens=out.completion_tokens)
        return ExtractResult(data=data, finish_reason=out.finish_reason, usage=usage, dropped=dropped,
                             truncated=out.info.truncated, repaired=repaired)

    def input_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        schema = super().input_schema(spec)
        if spec.spans is not None:
            schema["properties"]["types"] = {
                "oneOf": [{"type": "array", "items": {"type": "string"}},
                          {"type": "object", "additionalProperties": {"type": "string"}}],
                "description": "span types; default: " + ", ".join(spec.spans.types)}
        defaults = {"max_tokens": spec.defaults.max_tokens, "temperature": spec.defaults.temperature,
                    "top_p": spec.defaults.top_p}
        for key, value in GENERATION_PARAMS.items():
            schema["properties"][key] = {**value, **({"default": defaults[key]} if key in defaults else {})}
        return schema

    def output_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        spans = SpanConfig(spec.spans.field, spec.spans.text_key, spec.spans.type_key) if spec.spans else None
        return {"type": "object", "properties": {
            "data": result_schema(spec.output_schema, spans),
            "dropped": {"type": "integer", "description": "spans not found in the input, removed"},
            "finish_reason": FINISH_SCHEMA, "repaired": {"type": "boolean"}, "truncated": {"type": "boolean"},
            "usage": USAGE_SCHEMA}, "required": ["data", "dropped", "finish_reason", "repaired", "truncated", "usage"]}

    def describe(self, spec: "TaskSpec") -> dict[str, Any]:
        return {"types": list(spec.spans.types)} if spec.spans is not None else {}


def _json_string(inner: str) -> bool:
    try:
        json.loads(f'"{inner}"')
        return True
    except ValueError:
        return False

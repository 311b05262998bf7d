"""Task declarations: the schema of a task file (TOML), checked with pydantic.

A task is data, not code. A declaration gives the task's name, kind and prompt; the runner in
:mod:`allinone.tasks.runner` turns it into model calls. Minimal examples::

    # classify: the label set is scored, never generated
    name = "urgency"
    description = "Is a support ticket urgent?"
    kind = "classify"
    instructions.en = "Decide whether the support ticket needs an answer today."
    [[labels]]
    name = "urgent"
    [[labels]]
    name = "normal"

    # extract: constrained decoding to a JSON schema
    name = "people"
    kind = "extract"
    instructions.en = "List the people mentioned in the text."
    [output_schema]
    type = "object"
    required = ["people"]
    properties.people = { type = "array", maxItems = 20, items = { type = "string", maxLength = 60 } }

Every error names the file and the field, e.g.
``my.toml: labels[1].name: Field required``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Kind = Literal["classify", "extract", "generate"]
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
RESERVED_NAMES = frozenset({"analyze"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Label(_Strict):
    """One label of a ``classify`` task.

    ``verbalizers`` are the answers the model may give for it (their probabilities are summed);
    the default is the name itself plus a capitalized form. ``description`` is shown to the model.
    """

    name: str = Field(min_length=1, max_length=100)
    verbalizers: list[str] = Field(default_factory=list)
    description: str = ""

    @field_validator("verbalizers")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise ValueError("verbalizers must be non-empty strings")
        return v

    def words(self) -> tuple[str, ...]:
        if self.verbalizers:
            return tuple(dict.fromkeys(self.verbalizers))
        return tuple(dict.fromkeys([self.name, self.name[:1].upper() + self.name[1:]]))


class Example(_Strict):
    """A few-shot example, written by the task's author (never taken from evaluation data).

    ``label`` for classify, ``output`` (an object valid under the output schema) for extract,
    ``output`` as a string for generate. ``lang`` picks the prompts it goes with (any if omitted).
    """

    text: str = Field(min_length=1)
    label: str | None = None
    output: dict[str, Any] | str | None = None
    lang: str | None = None


class Spans(_Strict):
    """Marks an extract task whose output lists spans of the input (NER-like).

    The output has an array ``field`` of objects with ``text_key`` (the span's text, copied from
    the input) and ``type_key`` (one of ``types``; a request may narrow or change the types).
    Every span gets ``start``/``end`` character offsets; spans not found in the input are dropped
    and counted.
    """

    field: str = "entities"
    text_key: str = "text"
    type_key: str = "type"
    types: list[str] = Field(min_length=1)
    type_descriptions: dict[str, str] = Field(default_factory=dict)
    max_items: int = Field(32, ge=1, le=256)
    max_length: int = Field(100, ge=1, le=1000)

    def schema(self, types: list[str] | None = None) -> dict[str, Any]:
        item = {
            "type": "object",
            "properties": {
                self.text_key: {"type": "string", "minLength": 1, "maxLength": self.max_length},
                self.type_key: {"type": "string", "enum": list(types or self.types)},
            },
            "required": [self.text_key, self.type_key],
        }
        return {
            "type": "object",
            "properties": {self.field: {"type": "array", "maxItems": self.max_items, "items": item}},
            "required": [self.field],
        }


class Defaults(_Strict):
    """Per-task defaults a request may override."""

    lang: str = "auto"
    calibrate: bool = False
    max_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(0.8, ge=0.0, le=1.0)


class TaskSpec(_Strict):
    """A task declaration.

    Attributes:
        name: lower-case id used in the CLI, the API and the URL (``[a-z][a-z0-9_-]*``).
        description: one line shown in listings.
        kind: ``classify`` (score a label set), ``extract`` (JSON to a schema) or ``generate``.
        instructions: the system prompt per language code (``en``, ``zh``, ...).
        template: the user message per language; ``{text}`` is replaced by the (delimited) input.
        question: a line after the text repeating what to answer, per language (optional).
        labels: classify only; may be empty, then every request must give ``labels``.
        examples: few-shot examples.
        output_schema: extract only; the JSON Schema subset of :mod:`allinone.tasks.schema`.
        spans: extract only; NER-like output with offsets (the schema is derived when omitted).
        dedupe: extract only; names of top-level string-array fields to de-duplicate (case-insensitively).
        mood: generate only; label of the message's sentiment -> language -> a line added to the
            system prompt when the reply is to a message of that sentiment (``analyze``).
        defaults: request defaults.
    """

    name: str
    description: str = ""
    kind: Kind
    instructions: dict[str, str] = Field(min_length=1)
    template: dict[str, str] = Field(default_factory=dict)
    question: dict[str, str] = Field(default_factory=dict)
    labels: list[Label] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)
    output_schema: dict[str, Any] | None = None
    spans: Spans | None = None
    dedupe: list[str] = Field(default_factory=list)
    mood: dict[str, dict[str, str]] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    source: str = Field("<python>", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '_', starting with a letter (max 64)")
        if v in RESERVED_NAMES:
            raise ValueError(f"{v!r} is reserved (it names the multi-task route)")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: dict[str, str]) -> dict[str, str]:
        for lang, t in v.items():
            if "{text}" not in t and "{text_json}" not in t:
                raise ValueError(f"template.{lang} must contain {{text}} or {{text_json}}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("labels: names must be unique")
        return self

    # -- prompt pieces ------------------------------------------------------------------
    def examples_for(self, lang: str) -> list[Example]:
        """The examples written for ``lang`` (or for any language); all of them if none is."""
        chosen = [ex for ex in self.examples if ex.lang in (None, lang)]
        return chosen or list(self.examples)

    def languages(self) -> list[str]:
        return list(self.instructions)

    def prompt_sha256(self) -> str:
        """SHA-256 (hex) of what a classify prompt is written from: instructions, template,
        question, labels and examples. A head learned on a prompt's hidden states is tied to it:
        the same text read under another prompt gives other states."""
        pieces = self.model_dump(mode="json", include={"instructions", "template", "question", "labels", "examples"})
        return hashlib.sha256(json.dumps(pieces, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def format_errors(exc: ValidationError, source: str) -> str:
    """``source: field.path: message`` lines for every pydantic error."""
    lines = []
    for e in exc.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)

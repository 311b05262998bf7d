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

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import AllInOneError
from .schema import SchemaError, check_schema, validate

Kind = Literal["classify", "extract", "generate"]
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
DEFAULT_TEMPLATE = "<text>\n{text}\n</text>"
RESERVED_NAMES = frozenset({"analyze"})


class TaskDeclarationError(AllInOneError):
    """A task declaration is invalid; the message names the file (or source) and every bad field."""

    status_code = 400
    code = "invalid_task"
    error_type = "invalid_request_error"


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
    top_p: float = Field(0.8, gt=0.0, le=1.0)


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
        if self.kind != "classify" and self.labels:
            raise ValueError(f"labels: only a classify task has labels (this one is {self.kind})")
        if self.kind != "extract" and (self.output_schema is not None or self.spans is not None or self.dedupe):
            raise ValueError(f"output_schema/spans/dedupe: only an extract task has them (this one is {self.kind})")
        if self.kind == "extract":
            if self.output_schema is None and self.spans is None:
                raise ValueError("output_schema: an extract task needs output_schema or spans")
            try:
                schema = check_schema(self.output_schema if self.output_schema is not None else self.spans.schema())
            except SchemaError as exc:
                raise ValueError(str(exc)) from None
            object.__setattr__(self, "output_schema", schema)
            if self.spans is not None:
                field = schema["properties"].get(self.spans.field, {})
                item = field.get("items", {}) if field.get("type") == "array" else {}
                props = item.get("properties", {}) if item.get("type") == "object" else {}
                if self.spans.text_key not in props or self.spans.type_key not in props:
                    raise ValueError(
                        f"spans: output_schema must have an array '{self.spans.field}' of objects with "
                        f"'{self.spans.text_key}' and '{self.spans.type_key}'"
                    )
            for name in self.dedupe:
                prop = schema["properties"].get(name, {})
                if prop.get("type") != "array" or prop.get("items", {}).get("type") != "string":
                    raise ValueError(f"dedupe: {name!r} is not a top-level array of strings in output_schema")
        for i, ex in enumerate(self.examples):
            where = f"examples[{i}]"
            if self.kind == "classify":
                if ex.label is None or ex.output is not None:
                    raise ValueError(f"{where}: a classify example needs 'label' (and no 'output')")
                if not self.labels:
                    raise ValueError(f"{where}: examples need declared labels")
                if ex.label not in names:
                    raise ValueError(f"{where}.label: {ex.label!r} is not one of {names}")
            elif self.kind == "extract":
                if not isinstance(ex.output, dict) or ex.label is not None:
                    raise ValueError(f"{where}: an extract example needs 'output' as a table/object")
                errors = validate(ex.output, self.output_schema)
                if errors:
                    raise ValueError(f"{where}.output does not match output_schema: {errors[0]}")
            elif not isinstance(ex.output, str):
                raise ValueError(f"{where}: a generate example needs 'output' as a string")
        return self

    # -- prompt pieces ------------------------------------------------------------------
    def pick(self, table: dict[str, str], lang: str, default: str = "") -> str:
        """The entry for ``lang``, else English, else the first one, else ``default``."""
        if lang in table:
            return table[lang]
        if "en" in table:
            return table["en"]
        return next(iter(table.values()), default)

    def languages(self) -> list[str]:
        return list(self.instructions)


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


def parse_spec(data: dict[str, Any], source: str = "<python>") -> TaskSpec:
    """Validate a declaration given as a mapping (e.g. parsed TOML).

    Raises:
        TaskDeclarationError: with every problem, each line naming ``source`` and the field.
    """
    if not isinstance(data, dict):
        raise TaskDeclarationError(f"{source}: a task declaration must be a table/object")
    try:
        return TaskSpec.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise TaskDeclarationError(format_errors(exc, source)) from None


def load_spec(path: str | Path) -> TaskSpec:
    """Read and validate a TOML task file.

    Raises:
        TaskDeclarationError: unreadable file, TOML syntax error (with line), or an invalid field.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaskDeclarationError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TaskDeclarationError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise TaskDeclarationError(f"{path}: TOML syntax error: {exc}") from None
    return parse_spec(data, source=str(path))

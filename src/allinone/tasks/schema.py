"""The JSON Schema subset an ``extract`` task may declare, and what is done with it.

Both constrained decoders (llama.cpp grammars, llguidance for transformers) and the validator here
must agree exactly on what a schema allows, so a declaration may only use this subset:

* ``type``: ``object`` (the root must be one), ``array``, ``string``, ``integer``, ``number``,
  ``boolean``
* objects: ``properties``, ``required``, ``additionalProperties`` (only ``false``; it is implied)
* arrays: ``items`` (one schema), ``minItems``, ``maxItems``
* strings: ``enum`` (of strings), ``minLength``, ``maxLength``
* anywhere: ``description``, ``title`` (documentation only)

Anything else (``pattern``, ``oneOf``, ``$ref``, ``minimum`` ...) is rejected when the task is
declared, naming the place in the schema. :func:`validate` checks an instance against such a
schema; :func:`minimal_instance` builds the smallest valid instance; :func:`salvage_json` closes a
JSON text that generation cut off at ``max_tokens``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

TYPES = ("object", "array", "string", "integer", "number", "boolean")
_COMMON = {"type", "description", "title"}
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"enum", "minLength", "maxLength"},
    "integer": set(),
    "number": set(),
    "boolean": set(),
}


class SchemaError(ValueError):
    """A declared schema uses something outside the supported subset (message names the place)."""


def check_schema(schema: Any, where: str = "output_schema") -> dict[str, Any]:
    """Check ``schema`` is in the subset and return a normalized deep copy
    (``additionalProperties: false`` made explicit on every object).

    Raises:
        SchemaError: the first problem found, e.g. ``output_schema.properties.x: unsupported keyword 'pattern'``.
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: must be a table/object")
    if schema.get("type") != "object":
        raise SchemaError(f"{where}: the root must have type \"object\"")
    out = copy.deepcopy(schema)
    _check(out, where)
    return out


def _check(s: Any, where: str) -> None:
    if not isinstance(s, dict):
        raise SchemaError(f"{where}: must be a table/object")
    t = s.get("type")
    if t not in TYPES:
        raise SchemaError(f"{where}.type: must be one of {', '.join(TYPES)}, got {t!r}")
    for key in s:
        if key not in _COMMON | _BY_TYPE[t]:
            raise SchemaError(f"{where}: unsupported keyword {key!r} for type {t!r}")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in s and (isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 0):
            raise SchemaError(f"{where}.{key}: must be an integer >= 0")
    for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if lo in s and hi in s and s[lo] > s[hi]:
            raise SchemaError(f"{where}: {lo} is larger than {hi}")
    if t == "object":
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"{where}.properties: must be a table/object")
        for name, sub in props.items():
            _check(sub, f"{where}.properties.{name}")
        required = s.get("required", [])
        if not isinstance(required, list) or any(r not in props for r in required):
            raise SchemaError(f"{where}.required: must list names from properties")
        if s.get("additionalProperties", False) is not False:
            raise SchemaError(f"{where}.additionalProperties: only false is supported")
        s["additionalProperties"] = False
    elif t == "array":
        if "items" not in s:
            raise SchemaError(f"{where}: an array needs 'items'")
        _check(s["items"], f"{where}.items")
    elif t == "string" and "enum" in s:
        enum = s["enum"]
        if not isinstance(enum, list) or not enum or any(not isinstance(v, str) for v in enum):
            raise SchemaError(f"{where}.enum: must be a non-empty list of strings")


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema`` (empty list = valid)."""
    t = schema.get("type")
    errors: list[str] = []
    if t == "object":
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing required property {name!r}")
        for name, sub in value.items():
            if name not in props:
                errors.append(f"{where}: unexpected property {name!r}")
            else:
                errors += validate(sub, props[name], f"{where}.{name}")
    elif t == "array":
        if not isinstance(value, list):
            return [f"{where}: expected an array"]
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{i}]")
    elif t == "string":
        if not isinstance(value, str):
            return [f"{where}: expected a string"]
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']} characters")
    elif t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer")
    elif t == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number")
    elif t == "boolean" and not isinstance(value, bool):
        errors.append(f"{where}: expected a boolean")
    return errors


def minimal_instance(schema: dict[str, Any]) -> Any:
    """The smallest value valid under ``schema`` (required properties only, fewest items)."""
    t = schema.get("type")
    if t == "object":
        props = schema.get("properties", {})
        return {name: minimal_instance(props[name]) for name in schema.get("required", [])}
    if t == "array":
        return [minimal_instance(schema["items"]) for _ in range(schema.get("minItems", 0))]
    if t == "string":
        return schema["enum"][0] if "enum" in schema else "x" * schema.get("minLength", 0)
    if t in ("integer", "number"):
        return 0
    if t == "boolean":
        return False
    raise ValueError(f"unsupported schema type {t!r}")  # pragma: no cover - check_schema prevents it


def salvage_json(text: str) -> list[Any]:
    """Parse a JSON text that may have been cut off mid-way.

    The text is assumed to be a prefix of a valid document (as constrained decoding produces).
    Candidates are made by cutting it back to each point where the innermost open container held
    only complete values (just after ``[``/``{``, just before a ``,``, just after a closing
    bracket or a finished string element/member value) and closing the open containers; an
    unfinished element is dropped, never half-kept.

    Returns:
        Parsed candidates, the longest first (the whole text alone if it parses); may be empty.
        The caller keeps the first that validates against its schema.
    """
    try:
        return [json.loads(text, strict=False)]
    except ValueError:
        pass
    stack: list[str] = []
    points: list[tuple[int, str]] = []
    in_string = escape = False
    last = ""  # the last structural character outside strings
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
                # a complete string element of an array, or a complete member value of an object
                if stack and (stack[-1] == "]" or last == ":"):
                    points.append((i + 1, "".join(reversed(stack))))
            continue
        if ch in "[]{},:":
            last = ch
        if ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
            points.append((i + 1, "".join(reversed(stack))))
        elif ch in "]}":
            if stack:
                stack.pop()
            points.append((i + 1, "".join(reversed(stack))))
        elif ch == "," and stack:
            points.append((i, "".join(reversed(stack))))
    out = []
    for cut, closers in reversed(points):
        try:
            out.append(json.loads(text[:cut] + closers, strict=False))
        except ValueError:
            continue
    return out

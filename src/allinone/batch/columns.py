"""A task's result as output columns: the same for every row of a job, whatever the row's fate.

Every output row is ``id``, then the result's fields, then ``error`` (``None`` when the row has a
result; else the fields are ``None``). The fields are the top level of the result's ``to_dict()``
(``label``, ``scores``, ``truncated``, ``coverage``, ``warning`` for classify; ``text``,
``finish_reason``, ``usage``, ``truncated`` for generate); an extract task's ``data`` is lifted
one level, so NER gives an ``entities`` column and keywords a ``keywords`` column. Their types
come from the task's output schema, so a Parquet file has one fixed schema: ``scores`` is a
struct with one probability per label, ``entities`` a list of structs; a value the schema cannot
type exactly is written as JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: the columns every output has, around the result's
ID, ERROR = "id", "error"


@dataclass(frozen=True)
class Columns:
    """The output columns of one job (plain data: it travels to Ray actors).

    Attributes:
        kind: the task's kind (``classify``, ``extract``, ``generate``).
        names: the result's columns, in order (``id`` and ``error`` not included).
        schemas: each column's JSON schema (from the task's output schema).
        labels: classify: the label set, in order (the fields of ``scores``).
        lifted: extract: the fields of ``data`` that are columns, as (field, column).
    """

    kind: str
    names: tuple[str, ...]
    schemas: tuple[tuple[str, Any], ...]
    labels: tuple[str, ...] = ()
    lifted: tuple[tuple[str, str], ...] = ()

    @classmethod
    def for_task(cls, description: Mapping[str, Any], params: Mapping[str, Any]) -> "Columns":
        """The columns of a task, from its description (``AllInOne.describe_task`` or
        ``TaskRegistry.describe``: ``kind``, ``output_schema``, ``labels``) and the job's
        parameters (``labels`` replaces a classify task's own)."""
        kind = description["kind"]
        props: dict[str, Any] = dict(description["output_schema"].get("properties", {}))
        lifted: list[tuple[str, str]] = []
        if kind == "extract" and "data" in props:
            data = props.pop("data").get("properties", {})
            taken = set(props) | {ID, ERROR}
            lifted = [(name, name if name not in taken else f"data.{name}") for name in data]
            props = {**{col: data[name] for name, col in lifted}, **props}
        labels: tuple[str, ...] = ()
        if kind == "classify":
            given = params.get("labels")
            if isinstance(given, Mapping):
                labels = tuple(str(k) for k in given)
            elif isinstance(given, Sequence) and not isinstance(given, str):
                labels = tuple(str(v) for v in given)
            else:
                labels = tuple(description.get("labels") or ())
        return cls(kind, tuple(props), tuple(props.items()), labels, tuple(lifted))

    @property
    def all(self) -> tuple[str, ...]:
        """Every output column, in order."""
        return (ID, *self.names, ERROR)

    def row(self, row_id: str, result: Any = None, error: str | None = None) -> dict[str, Any]:
        """One output row: ``result`` (a typed result with ``to_dict()``) or ``error``."""
        values: dict[str, Any] = {}
        if error is None:
            values = result.to_dict()
            if self.lifted:
                data = values.pop("data", {}) or {}
                values.update({col: data.get(name) for name, col in self.lifted})
        return {ID: row_id, **{n: values.get(n) for n in self.names}, ERROR: error}

    # -- Parquet ------------------------------------------------------------------------------
    def arrow_schema(self) -> Any:
        """The pyarrow schema of the output (needs pyarrow)."""
        import pyarrow as pa

        fields = [pa.field(ID, pa.string(), nullable=False)]
        for name, schema in self.schemas:
            fields.append(pa.field(name, self._type(name, schema) or pa.string()))
        fields.append(pa.field(ERROR, pa.string()))
        return pa.schema(fields)

    def to_arrow_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """``row`` with the values of untyped columns as JSON text."""
        out = dict(row)
        for name, schema in self.schemas:
            if self._type(name, schema) is None and out.get(name) is not None:
                out[name] = json.dumps(out[name], ensure_ascii=False)
        return out

    def _type(self, name: str, schema: Any) -> Any:
        import pyarrow as pa

        if name == "scores" and self.kind == "classify" and self.labels:
            return pa.struct([pa.field(label, pa.float64()) for label in self.labels])
        return arrow_type(schema)


def arrow_type(schema: Any) -> Any:
    """The pyarrow type of values under a JSON schema (the subset tasks declare: object, array,
    string, integer, number, boolean, a type or null), or ``None`` when there is no exact one (an
    object without properties, a union): such values are written as JSON text."""
    import pyarrow as pa

    if not isinstance(schema, Mapping):
        return None
    t = schema.get("type")
    if isinstance(t, list):
        kinds = [k for k in t if k != "null"]
        if len(kinds) != 1:
            return None
        t = kinds[0]
    if t == "string":
        return pa.string()
    if t == "integer":
        return pa.int64()
    if t == "number":
        return pa.float64()
    if t == "boolean":
        return pa.bool_()
    if t == "array":
        item = arrow_type(schema.get("items"))
        return pa.list_(item) if item is not None else None
    if t == "object":
        props = schema.get("properties") or {}
        types = {k: arrow_type(v) for k, v in props.items()}
        if not types or any(v is None for v in types.values()):
            return None
        return pa.struct([pa.field(k, v) for k, v in types.items()])
    return None

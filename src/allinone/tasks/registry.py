"""The task registry: built-in declarations, a user's tasks folder, and tasks registered in Python.

>>> reg = TaskRegistry()                      # the built-ins
>>> reg.load_dir("my_tasks")                  # every *.toml in a folder (or Settings.tasks_dir)
>>> reg.register({"name": "urgency", "kind": "classify", ...})
>>> [t["name"] for t in reg.list()]           # name, kind, description, input/output JSON schema

A later declaration with the same name replaces the earlier one (a user's ``sentiment.toml``
overrides the built-in), except that two files of one folder may not declare the same name.
"""

from __future__ import annotations

import re
import threading
import tomllib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import TaskDeclarationError, UnknownTaskError
from .kinds import KINDS, kind_of
from .spec import TaskSpec, format_errors

BUILTIN_TASKS = ("sentiment", "sentiment3", "intent", "ner", "keywords", "chat")

#: what a declaration's instructions, question and template may name in braces
PLACEHOLDERS = ("text", "text_json", "labels", "label_list", "types", "type_list")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_spec(spec: TaskSpec) -> TaskSpec:
    """The checks a declaration's kind makes (fields only another kind may set, examples that
    fit the kind, a derivable output schema).

    Raises:
        TaskDeclarationError: naming the declaration's source and the field.
    """
    kind = KINDS[spec.kind]
    try:
        owned = {f for k in KINDS.values() for f in k.fields}
        for name in sorted(owned - kind.fields):
            if getattr(spec, name) not in (None, [], {}):
                owners = " / ".join(k.name for k in KINDS.values() if name in k.fields)
                raise ValueError(f"{name}: only a {owners} task has it (this one is {spec.kind})")
        for field in ("instructions", "question", "template"):
            for lang, text in (getattr(spec, field, None) or {}).items():
                for name in _PLACEHOLDER.findall(text):
                    if name not in PLACEHOLDERS:  # it would reach the model as written
                        raise ValueError(f"{field}.{lang}: unknown placeholder {{{name}}} "
                                         f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        kind.check_spec(spec)
    except ValueError as exc:
        raise TaskDeclarationError(f"{spec.source}: {exc}") from None
    return spec


def parse_spec(data: dict[str, Any], source: str = "<python>") -> TaskSpec:
    """Validate a declaration given as a mapping (e.g. parsed TOML).

    Raises:
        TaskDeclarationError: with every problem, each line naming ``source`` and the field.
    """
    if not isinstance(data, dict):
        raise TaskDeclarationError(f"{source}: a task declaration must be a table/object")
    try:
        spec = TaskSpec.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise TaskDeclarationError(format_errors(exc, source)) from None
    return check_spec(spec)


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


def builtin_specs() -> list[TaskSpec]:
    """The declarations shipped inside the package (``allinone/tasks/*.toml``)."""
    folder = resources.files(__package__)
    return [load_spec(Path(str(folder / f"{name}.toml"))) for name in BUILTIN_TASKS]


class TaskRegistry:
    """Task declarations by name. Thread-safe for reads and registration."""

    def __init__(self, *, builtins: bool = True, tasks_dir: str | Path | None = None) -> None:
        self._specs: dict[str, TaskSpec] = {}
        self._lock = threading.Lock()
        if builtins:
            for spec in builtin_specs():
                self._specs[spec.name] = spec
        if tasks_dir is not None:
            self.load_dir(tasks_dir)

    def register(self, spec: TaskSpec | Mapping[str, Any] | str | Path) -> TaskSpec:
        """Add (or replace) a task.

        Args:
            spec: a :class:`TaskSpec`, a mapping with the declaration's fields, or a path to a
                ``.toml`` file.

        Raises:
            TaskDeclarationError: the declaration is invalid (the message names the field).
        """
        if isinstance(spec, (str, Path)):
            spec = load_spec(spec)
        elif isinstance(spec, Mapping):
            spec = parse_spec(dict(spec))
        elif isinstance(spec, TaskSpec):
            spec = check_spec(spec)
        else:
            raise TaskDeclarationError("register() takes a TaskSpec, a mapping or a path to a .toml file")
        with self._lock:
            self._specs[spec.name] = spec
        return spec

    def load_dir(self, folder: str | Path) -> list[TaskSpec]:
        """Register every ``*.toml`` file in ``folder`` (not recursive).

        Raises:
            TaskDeclarationError: the folder is missing, or any file is invalid (all problems of
                all files are reported together), or two files declare the same name.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TaskDeclarationError(f"tasks folder not found: {folder}")
        specs, problems = [], []
        for path in sorted(folder.glob("*.toml")):
            try:
                specs.append(load_spec(path))
            except TaskDeclarationError as exc:
                problems.append(exc.message)
        names: dict[str, str] = {}
        for spec in specs:
            if spec.name in names:
                problems.append(f"{spec.source}: name {spec.name!r} is already declared in {names[spec.name]}")
            names[spec.name] = spec.source
        if problems:
            raise TaskDeclarationError("\n".join(problems))
        with self._lock:
            for spec in specs:
                self._specs[spec.name] = spec
        return specs

    def get(self, name: str) -> TaskSpec:
        """Raises: UnknownTaskError (404), naming the tasks there are."""
        spec = self._specs.get(name)
        if spec is None:
            raise UnknownTaskError(f"unknown task {name!r}; available: {', '.join(sorted(self._specs))}", param="task")
        return spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def describe(self, name: str) -> dict[str, Any]:
        """Name, kind, description, languages, labels/types, and the input and output JSON schemas."""
        spec = self.get(name)
        kind = kind_of(spec)
        return {
            "name": spec.name,
            "kind": spec.kind,
            "description": spec.description,
            "languages": spec.languages(),
            "input_schema": kind.input_schema(spec),
            "output_schema": kind.output_schema(spec),
            **kind.describe(spec),
        }

    def list(self) -> list[dict[str, Any]]:
        """:meth:`describe` of every task, sorted by name."""
        return [self.describe(name) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter([self._specs[n] for n in self.names()])

    def __len__(self) -> int:
        return len(self._specs)

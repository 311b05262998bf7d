"""The task kinds, one object each, found by name: the only place that tells kinds apart.

>>> kind_of(spec).jobs(compiled, text, request)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Limits, Request, TaskKind
from .classify import ClassifyKind, ClassifyTask
from .extract import ExtractKind, ExtractTask
from .generate import GenerateKind, reply_chunks

if TYPE_CHECKING:
    from ..spec import TaskSpec

KINDS: dict[str, TaskKind] = {k.name: k for k in (ClassifyKind(), ExtractKind(), GenerateKind())}


def kind_of(spec: "TaskSpec") -> TaskKind:
    """The kind object of a declaration."""
    return KINDS[spec.kind]


__all__ = ["KINDS", "ClassifyKind", "ClassifyTask", "ExtractKind", "ExtractTask", "GenerateKind", "Limits",
           "Request", "TaskKind", "kind_of", "reply_chunks"]

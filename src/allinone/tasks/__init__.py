"""Tasks: how an input becomes engine jobs for the one model, and how their outputs become a result.

Tasks are declarations (TOML files checked by :mod:`.spec`); the built-ins are such files in this
package. What a task does is decided by its *kind* (:mod:`.kinds`: classify, extract, generate),
one object each. A task never calls a backend or the engine: it builds plain jobs and parses
their outputs; :class:`~allinone.api.AllInOne` runs the jobs.
"""

from .chat import ChatProfile, ChatRequest
from .kinds import KINDS, ClassifyTask, ExtractTask, Limits, Request, TaskKind, kind_of, reply_chunks
from .prompting import TaskPrompt, detect_lang
from .registry import BUILTIN_TASKS, TaskRegistry, load_spec, parse_spec
from .spec import TaskSpec

__all__ = [
    "BUILTIN_TASKS", "KINDS", "ChatProfile", "ChatRequest", "ClassifyTask", "ExtractTask", "Limits", "Request", "TaskKind",
    "TaskPrompt", "TaskRegistry", "TaskSpec", "detect_lang", "kind_of", "load_spec", "parse_spec", "reply_chunks",
]

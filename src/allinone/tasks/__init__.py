"""Tasks: how an input becomes a prompt for the one model, and how the output becomes a result.

Tasks are declarations (TOML files checked by :mod:`.spec`); the built-ins are such files in this
package. A task never calls a backend on its own initiative: the engine runs a task's function
on its worker thread, handing it the backend.
"""

from .builtin import SENTIMENT
from .chat import ChatRequest, chat_stream, prepare_chat
from .classify import ClassifyTask, classify, prepare_text
from .extract import ExtractTask, extract
from .registry import BUILTIN_TASKS, TaskRegistry
from .spec import TaskDeclarationError, TaskSpec, load_spec, parse_spec

__all__ = [
    "BUILTIN_TASKS", "ChatRequest", "ClassifyTask", "ExtractTask", "SENTIMENT", "TaskDeclarationError",
    "TaskRegistry", "TaskSpec", "chat_stream", "classify", "extract", "load_spec", "parse_spec",
    "prepare_chat", "prepare_text",
]

"""Tasks: how an input becomes a prompt for the one model, and how the output becomes a result.

Tasks are declarations (TOML files checked by :mod:`.spec`); the built-ins are such files in this
package. A task never calls a backend on its own initiative: the engine runs a task's functions
on its worker thread, handing them the backend (``*_request`` / ``plan_*`` build what to compute,
``*_result`` turns the model's output into the result).
"""

from .builtin import SENTIMENT
from .chat import ChatRequest, chat_chunks, plan_chat, prepare_chat
from .classify import ClassifyTask, classify, classify_request, classify_result, prepare_text
from .extract import ExtractTask, extract, extract_result, plan_extract
from .registry import BUILTIN_TASKS, TaskRegistry
from .spec import TaskDeclarationError, TaskSpec, load_spec, parse_spec

__all__ = [
    "BUILTIN_TASKS", "ChatRequest", "ClassifyTask", "ExtractTask", "SENTIMENT", "TaskDeclarationError",
    "TaskRegistry", "TaskSpec", "chat_chunks", "classify", "classify_request", "classify_result", "extract",
    "extract_result", "load_spec", "parse_spec", "plan_chat", "plan_extract", "prepare_chat", "prepare_text",
]

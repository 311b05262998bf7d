"""Tasks: how an input becomes a prompt for the one model, and how the output becomes a result.

A task never calls a backend on its own initiative: the engine runs a task's function on its
worker thread, handing it the backend.
"""

from .chat import ChatRequest, chat_stream, prepare_chat
from .classify import ClassifyTask, classify, prepare_text
from .builtin import SENTIMENT

__all__ = ["ChatRequest", "ClassifyTask", "SENTIMENT", "chat_stream", "classify", "prepare_chat", "prepare_text"]

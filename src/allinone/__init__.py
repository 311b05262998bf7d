"""allinone: many NLP tasks from one small instruction-tuned model on a CPU.

>>> from allinone import AllInOne
>>> ai = AllInOne.load()                       # the embedded Qwen2.5 0.5B model, llama.cpp
>>> ai.sentiment("What a lovely day!").label
'positive'
"""

from .api import AllInOne
from .errors import AllInOneError, InvalidInputError, ModelSourceError, UnknownTaskError
from .results import (AnalyzeResult, ChatChunk, ChatResult, ClassifyResult, ExtractResult, SentimentResult,
                      TaskResult, Usage)
from .settings import Settings
from .tasks import TaskDeclarationError, TaskRegistry, TaskSpec

__all__ = [
    "AllInOne", "AllInOneError", "AnalyzeResult", "ChatChunk", "ChatResult", "ClassifyResult", "ExtractResult",
    "InvalidInputError", "ModelSourceError", "SentimentResult", "Settings", "TaskDeclarationError",
    "TaskRegistry", "TaskResult", "TaskSpec", "UnknownTaskError", "Usage",
]
__version__ = "0.1.0"

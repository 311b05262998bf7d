"""allinone: many NLP tasks from one small instruction-tuned model on a CPU.

>>> from allinone import AllInOne
>>> ai = AllInOne.load()                       # the embedded Qwen2.5 0.5B model, llama.cpp
>>> ai.sentiment("What a lovely day!").label
'positive'
"""

from .api import AllInOne
from .errors import (
    AllInOneError,
    BackendUnavailableError,
    ContextLengthError,
    InvalidInputError,
    ModelSourceError,
    OverloadedError,
    RequestTimeoutError,
    ShuttingDownError,
    TaskDeclarationError,
    TrainingDataError,
    UnknownTaskError,
)
from .results import (
                      AnalyzeResult,
                      ChatChunk,
                      ChatResult,
                      ClassifyResult,
                      ExtractResult,
                      SentimentResult,
                      TaskResult,
                      Usage,
)
from .settings import Settings
from .tasks import TaskRegistry, TaskSpec
from .types import SamplingParams

__all__ = [
    "AllInOne", "AllInOneError", "AnalyzeResult", "BackendUnavailableError", "ChatChunk", "ChatResult", "ContextLengthError",
    "ClassifyResult", "ExtractResult", "InvalidInputError", "ModelSourceError", "OverloadedError",
    "RequestTimeoutError", "SamplingParams", "SentimentResult", "Settings", "ShuttingDownError", "TaskDeclarationError",
    "TaskRegistry", "TaskResult", "TaskSpec", "TrainingDataError", "UnknownTaskError", "Usage",
]
__version__ = "0.1.0"

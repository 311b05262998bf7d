"""The engine: owns the backend on one worker thread and runs plain jobs from every surface.

>>> engine = Engine.load(resolve_model("embedded"))
>>> out = engine.run(ScoreJob(Prompt(messages=[...]), continuations=("positive", "negative")))
"""

from .core import (
                   DEFAULT,
                   Engine,
                   EngineStats,
                   GenerateOutput,
                   GenerationStream,
                   ModelInfo,
                   Pending,
                   ReplyStream,
                   collect,
)
from .device import DeviceLock
from .jobs import (
                   TEXT_SLOT,
                   EncodeJob,
                   EncodeOutput,
                   GenerateJob,
                   Job,
                   Prompt,
                   PromptInfo,
                   ScoreJob,
                   ScoreOutput,
                   TokenizeJob,
)

__all__ = [
    "DEFAULT", "TEXT_SLOT", "DeviceLock", "EncodeJob", "EncodeOutput", "Engine", "EngineStats", "GenerateJob", "GenerateOutput",
    "GenerationStream", "Job", "ModelInfo", "Pending", "Prompt", "PromptInfo", "ReplyStream", "ScoreJob", "ScoreOutput",
    "TokenizeJob", "collect",
]

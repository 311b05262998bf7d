"""Built-in task constants compiled from the declarations shipped with the package."""

from __future__ import annotations

from pathlib import Path

from .classify import ClassifyTask
from .runner import build_request, compile_classify
from .spec import load_spec

_SENTIMENT_SPEC = load_spec(Path(__file__).with_name("sentiment.toml"))

#: The English prompt of the built-in ``sentiment`` task (``ai.sentiment`` picks the prompt
#: language from the text; this constant is the English form, kept for direct use).
SENTIMENT: ClassifyTask = compile_classify(_SENTIMENT_SPEC, build_request(_SENTIMENT_SPEC, "", {"lang": "en"}))

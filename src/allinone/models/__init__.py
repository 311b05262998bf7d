"""Model sources: turn a model spec into a verified local path.

``resolve_model`` handles the embedded aliases, local ``.gguf`` files and model folders, and
Hugging Face Hub ids; ``gguf_to_hf`` converts a GGUF once into a Hugging Face folder for the
transformers backend.
"""

from allinone.models.convert import gguf_to_hf
from allinone.models.embedded import EMBEDDED_MODELS, EmbeddedModel, ensure_embedded
from allinone.models.sources import ModelSource, default_cache_dir, resolve_model

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelSource",
    "default_cache_dir",
    "ensure_embedded",
    "gguf_to_hf",
    "resolve_model",
]

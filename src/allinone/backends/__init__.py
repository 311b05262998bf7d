"""Inference backends behind one narrow interface (see :mod:`allinone.backends.base`)."""

from __future__ import annotations

import importlib.util

from ..errors import BackendUnavailableError
from ..models import ModelSource, gguf_to_hf
from .base import Backend, GenState, TextStreamer, stream_text

__all__ = ["Backend", "GenState", "TextStreamer", "load_backend", "stream_text"]


def load_backend(source: ModelSource, backend: str = "auto", *, n_ctx: int = 4096,
                 n_threads: int | None = None, dtype: str = "float32", cache_dir=None,
                 kv_cache_mb: float = 128, batch_invariant: bool = False) -> Backend:
    """Load ``source`` on the named backend.

    ``auto`` picks llama.cpp for a GGUF file (transformers if llama-cpp-python is missing) and
    transformers for an HF folder. ``transformers`` with a GGUF converts it once to safetensors
    in the cache (about 1.5 minutes for the 0.5B model; later loads take seconds).
    ``batch_invariant``: see :attr:`Backend.batch_invariant`.

    Raises:
        BackendUnavailableError: unknown backend, a missing library, or a pairing that cannot
            work (llama.cpp cannot read an HF folder).
    """
    if backend == "auto":
        if source.kind == "gguf" and importlib.util.find_spec("llama_cpp") is not None:
            backend = "llamacpp"
        else:
            backend = "transformers"
    if backend == "llamacpp":
        if source.kind != "gguf":
            raise BackendUnavailableError(
                f"the llamacpp backend needs a .gguf file; {source.name} is a Hugging Face folder "
                "(use --backend transformers)"
            )
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(source.path, n_ctx=n_ctx, n_threads=n_threads, kv_cache_mb=kv_cache_mb,
                               model_id=source.name, batch_invariant=batch_invariant)
    if backend == "transformers":
        from .transformers import TransformersBackend

        path = gguf_to_hf(source.path, cache_dir=cache_dir) if source.kind == "gguf" else source.path
        return TransformersBackend(path, dtype=dtype, n_ctx=n_ctx, n_threads=n_threads, kv_cache_mb=kv_cache_mb,
                                   model_id=source.name, batch_invariant=batch_invariant)
    raise BackendUnavailableError(f"unknown backend {backend!r}; choose auto, llamacpp or transformers")

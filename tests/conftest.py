"""Shared pytest fixtures: tiny random Qwen2 models for the backend unit tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # make `fixtures.*` importable whatever the rootdir/import mode
    sys.path.insert(0, _TESTS_DIR)

from fixtures.tiny_models import make_tiny_gguf, make_tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FP32 Qwen2ForCausalLM + Qwen2-like tokenizer, saved as an HF directory."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_gguf_path(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model as an F32 `qwen2` GGUF (alone in its directory, named `tiny-qwen2-f32.gguf`)."""
    pytest.importorskip("gguf")
    return make_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("tiny_gguf") / "tiny-qwen2-f32.gguf")


@pytest.fixture(scope="session")
def tiny_llamacpp(tiny_gguf_path: Path):
    """The tiny model loaded on the llama.cpp backend."""
    pytest.importorskip("llama_cpp")
    from allinone.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(tiny_gguf_path, n_ctx=512, model_id="tiny")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tiny_transformers(tiny_hf_dir: Path):
    """The tiny model loaded on the transformers backend."""
    from allinone.backends.transformers import TransformersBackend

    backend = TransformersBackend(tiny_hf_dir, n_ctx=512, model_id="tiny")
    yield backend
    backend.close()


@pytest.fixture(params=["llamacpp", "transformers"])
def tiny_backend(request):
    """Each backend in turn, on the same tiny random model."""
    return request.getfixturevalue(f"tiny_{request.param}")

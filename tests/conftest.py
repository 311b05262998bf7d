"""Shared pytest fixtures: hermetic settings, test tiers, tiny random Qwen2 models.

Tiers: every test is marked by what it runs on (``-m fake``, ``-m tiny``, ``-m embedded``,
``-m browser``): ``embedded`` and ``browser`` by their folders, ``tiny`` when it uses a tiny-model
fixture, ``fake`` otherwise.

Hermetic: no ``ALLINONE_*`` variable of the caller's shell reaches a test, and the cache folder
is a fresh temporary one; only the embedded model itself is read from the user's model cache
(``model_cache``), since assembling and converting it takes minutes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # make `fixtures.*` importable whatever the rootdir/import mode
    sys.path.insert(0, _TESTS_DIR)

from allinone.models import default_cache_dir  # noqa: E402
from fixtures.tiny_models import make_tiny_gguf, make_tiny_hf_model  # noqa: E402

#: the user's model cache, read before the environment is cleaned
MODEL_CACHE = default_cache_dir()
_TINY_FIXTURES = {"tiny_hf_dir", "tiny_gguf_path", "tiny_llamacpp", "tiny_transformers", "tiny_backend"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.embedded)
        elif "browser" in parts:
            item.add_marker(pytest.mark.browser)
        elif _TINY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.tiny)
        else:
            item.add_marker(pytest.mark.fake)


@pytest.fixture(scope="session", autouse=True)
def _hermetic(tmp_path_factory: pytest.TempPathFactory):
    """No ``ALLINONE_*`` setting from outside; a temporary cache folder for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("ALLINONE_")]:
            mp.delenv(name)
        mp.setenv("ALLINONE_CACHE_DIR", str(tmp_path_factory.mktemp("allinone-cache")))
        yield


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where the embedded model is assembled and converted once (the user's cache)."""
    return MODEL_CACHE


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

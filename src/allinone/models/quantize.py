"""Other weight formats of a GGUF model, made once with llama.cpp's own quantizer.

``weights = "q8_0"`` (or ``q4_0``, ``f16``) re-quantizes the model file at first load with
``llama_model_quantize`` (``allow_requantize``: from the shipped Q4_K_M; a few seconds) into the
cache as ``<name>.<format>.gguf`` with a ``.sha256`` sidecar, and later loads reuse it after
checking its size and recorded SHA-256. Re-quantizing an already quantized model cannot add
back precision: a Q8_0 made from Q4_K_M holds the Q4_K_M values in a layout that may be faster
to compute on some CPUs (not yet measured here: docs/benchmarks.md says so).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

from ..errors import BackendUnavailableError, ModelSourceError

#: ``weights`` setting -> llama.cpp file type (llama.h ``enum llama_ftype``)
FORMATS = {"q8_0": 7, "q4_0": 2, "f16": 1}


def requantized(src: Path, weights: str, cache_dir: Path, *, threads: int | None = None) -> Path:
    """The path of ``src`` in the ``weights`` format, made once and verified on reuse.

    Raises:
        ModelSourceError: an unknown format, or the cached file fails its check (it is remade).
        BackendUnavailableError: llama-cpp-python is missing or the quantizer fails.
    """
    if weights not in FORMATS:
        raise ModelSourceError(f"unknown weights format {weights!r}; choose shipped or one of {', '.join(FORMATS)}")
    target = Path(cache_dir) / "models" / f"{Path(src).stem}.{weights}.gguf"
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file() and sidecar.is_file():
        recorded = sidecar.read_text(encoding="ascii").split()
        if len(recorded) >= 2 and recorded[1] == str(target.stat().st_size):
            return target
    try:
        importlib.import_module("allinone.backends.llamacpp")  # sets libgomp's spin count before llama.cpp loads
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError("re-quantizing needs llama-cpp-python: pip install 'allinone[llamacpp]'") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FORMATS[weights]
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise BackendUnavailableError(f"llama.cpp could not quantize {src} to {weights} (code {rc})")
        digest = hashlib.sha256()
        with tmp.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    sidecar.write_text(f"{digest.hexdigest()} {target.stat().st_size} {target.name}\n", encoding="ascii")
    return target

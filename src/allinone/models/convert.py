"""Convert a GGUF file once into a Hugging Face model folder for the transformers backend.

transformers can load a GGUF directly, but it dequantizes every tensor on each load (most of the
~45 s the 0.5B Q4_K_M conversion takes on 2 CPU cores). Converting once to FP32 safetensors makes
later loads take about 2 s, at the price of a bigger folder (~4 bytes per parameter: 2.4 GiB for
the 0.5B model, whose GGUF keeps separate input and output embeddings).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from allinone.errors import BackendUnavailableError, ModelSourceError

logger = logging.getLogger(__name__)

#: Bytes read from each end of the GGUF for the fingerprint.
_FINGERPRINT_SPAN = 1024 * 1024

#: Token texts that end a turn or a document in common chat models. llama.cpp treats these as
#: end-of-generation tokens even when the GGUF names only one EOS id, so the converted model
#: stops on the same tokens as the llama.cpp backend.
_EOG_TOKEN_TEXTS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
)


def gguf_fingerprint(gguf_path: Path) -> str:
    """A cheap content fingerprint of a file: SHA-256 of its size, first and last 1 MiB.

    Reading 2 MiB instead of the whole file keeps this instant for 1 GB models; GGUF headers
    (metadata) sit at the start and tensor data runs to the end, so edits change it in practice.

    Returns:
        64 lower-case hex digits.
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(str(size).encode("ascii") + b"\0")
    with open(gguf_path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_SPAN))
        f.seek(max(0, size - _FINGERPRINT_SPAN))
        digest.update(f.read(_FINGERPRINT_SPAN))
    return digest.hexdigest()


def converted_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where :func:`gguf_to_hf` puts the conversion of ``gguf_path``.

    Returns:
        ``<cache>/hf/<stem>-<size in bytes>-<first 12 hex of the fingerprint>``.
    """
    from allinone.models.sources import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf_path = Path(gguf_path)
    size = gguf_path.stat().st_size
    return root / "hf" / f"{gguf_path.stem}-{size}-{gguf_fingerprint(gguf_path)[:12]}"


def _read_gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    """The scalar/string ``tokenizer.*`` metadata of a GGUF (no token arrays)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key.endswith((".tokens", ".token_type", ".merges", ".scores")):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # unusual field types: not needed here
            logger.debug("Skipping GGUF field %s", key)
    return out


def _eos_ids(meta: dict[str, Any], tokenizer: Any) -> list[int]:
    ids: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int) and value >= 0 and value not in ids:
            ids.append(value)

    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        add(meta.get(key))
    add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for text in _EOG_TOKEN_TEXTS:
        add(vocab.get(text))
    return ids


def _convert(gguf_path: Path, out_dir: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig
    except ImportError as exc:
        raise BackendUnavailableError(
            "Converting a GGUF for the transformers backend needs torch and transformers: "
            "`pip install 'allinone[transformers]'`."
        ) from exc
    # transformers refuses gguf_file= without accelerate, with a plain ValueError deep in
    # from_pretrained; say so up front in our own terms.
    if importlib.util.find_spec("accelerate") is None:
        raise BackendUnavailableError(
            "Loading a GGUF with transformers needs the accelerate package: `pip install accelerate`."
        )

    parent, name = str(gguf_path.parent), gguf_path.name
    meta = _read_gguf_metadata(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    if not tokenizer.chat_template and isinstance(meta.get("tokenizer.chat_template"), str):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    # dequantize=True: unpack every tensor into plain nn.Linear weights. Without it transformers
    # keeps a GGUF quantizer attached (packed blocks when a kernel is available) and refuses to
    # save_pretrained the model.
    model = AutoModelForCausalLM.from_pretrained(
        parent,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if any(not p.dtype.is_floating_point for p in model.parameters()):
            raise ModelSourceError(
                f"transformers kept {gguf_path.name} quantized, so it cannot be saved as a "
                "plain model; use the llama.cpp backend for it."
            )
        quantizer.remove_quantization_config(model)

    eos = _eos_ids(meta, tokenizer)
    gen = model.generation_config or GenerationConfig()
    if eos:
        gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    pad = meta.get("tokenizer.ggml.padding_token_id", tokenizer.pad_token_id)
    if isinstance(pad, int) and gen.pad_token_id is None:
        gen.pad_token_id = pad
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if isinstance(bos, int) and gen.bos_token_id is None:
        gen.bos_token_id = bos
    model.generation_config = gen

    # The GGUF tokenizer loader leaves model_max_length at transformers' "unlimited" sentinel.
    if tokenizer.model_max_length > 10**9 and getattr(model.config, "max_position_embeddings", None):
        tokenizer.model_max_length = model.config.max_position_embeddings

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def gguf_to_hf(gguf_path: Path, *, cache_dir: Path | None = None) -> Path:
    """Convert ``gguf_path`` once into an FP32 Hugging Face folder and return the folder.

    The result is cached in ``<cache>/hf/<stem>-<size>-<fingerprint12>/`` (see
    :func:`converted_dir`); later calls return it at once. The folder holds ``config.json``,
    ``generation_config.json`` (with all end-of-generation ids), ``model.safetensors`` and the
    tokenizer files including the chat template. It is written to a temp folder and renamed
    into place, so a crash never leaves a half-written model behind.

    Args:
        gguf_path: The GGUF file (any architecture transformers can load from GGUF).
        cache_dir: allinone cache root; defaults to :func:`default_cache_dir`.

    Returns:
        Path of the converted folder.

    Raises:
        ModelSourceError: ``gguf_path`` is missing or not a GGUF, or the conversion failed
            (e.g. an architecture transformers cannot load from GGUF).
        BackendUnavailableError: torch or transformers is not installed.
    """
    from allinone.models.sources import check_gguf

    gguf_path = check_gguf(Path(gguf_path).expanduser())
    target = converted_dir(gguf_path, cache_dir)
    if (target / "config.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        logger.info("Converting %s to a transformers folder in %s (once)", gguf_path, target)
        try:
            _convert(gguf_path, tmp)
        except (BackendUnavailableError, ModelSourceError):
            raise
        except Exception as exc:
            raise ModelSourceError(
                f"Could not convert {gguf_path} for the transformers backend: "
                f"{type(exc).__name__}: {exc}. Use the llama.cpp backend for this GGUF, or pass "
                "a Hugging Face model folder instead."
            ) from exc
        # mkdtemp makes the folder 0700; the cache should be as readable as any other.
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

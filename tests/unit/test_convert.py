"""Tests of allinone.models.convert on the tiny F32 qwen2 GGUF from tests/fixtures/tiny_models.py.

Uses the session fixtures ``tiny_gguf_path`` / ``tiny_hf_dir`` from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from allinone.errors import ModelSourceError
from allinone.models import convert, gguf_to_hf
from allinone.models.convert import converted_dir, gguf_fingerprint

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")


@pytest.fixture(scope="module")
def converted(tiny_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(cache_dir, folder)`` after one conversion of the tiny GGUF."""
    cache = tmp_path_factory.mktemp("convert-cache")
    return cache, gguf_to_hf(tiny_gguf_path, cache_dir=cache)


def test_folder_layout_and_name(converted, tiny_gguf_path):
    cache, folder = converted
    size = tiny_gguf_path.stat().st_size
    assert folder.parent == cache / "hf"
    assert re.fullmatch(rf"tiny-qwen2-f32-{size}-[0-9a-f]{{12}}", folder.name)
    assert folder == converted_dir(tiny_gguf_path, cache)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    # Only the final folder: no temp folder left next to it.
    assert [p.name for p in (cache / "hf").iterdir()] == [folder.name]


def test_converted_model_matches_original(converted, tiny_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = converted
    tok = AutoTokenizer.from_pretrained(folder)
    ref_tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    text = "Hello! How are you today? 你好"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_chat_template_and_eos_ids_survive(converted, tiny_hf_dir):
    from transformers import AutoTokenizer

    _, folder = converted
    tok = AutoTokenizer.from_pretrained(folder)
    ref_tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert tok.chat_template == ref_tok.chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )

    gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    im_end, endoftext = ref_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert eos[0] == im_end  # the GGUF's own EOS comes first
    assert set(eos) == {im_end, endoftext}
    assert gen["pad_token_id"] == endoftext


def test_second_call_returns_cached_folder_without_converting(converted, tiny_gguf_path, monkeypatch):
    cache, folder = converted
    monkeypatch.setattr(convert, "_convert", lambda *a: pytest.fail("converted twice"))
    assert gguf_to_hf(tiny_gguf_path, cache_dir=cache) == folder


def test_uses_default_cache_dir(tiny_gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLINONE_CACHE_DIR", str(tmp_path))
    assert converted_dir(tiny_gguf_path).parent == tmp_path / "hf"


def test_failed_conversion_leaves_nothing(tiny_gguf_path, tmp_path, monkeypatch):
    def half_then_fail(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("unsupported architecture")

    monkeypatch.setattr(convert, "_convert", half_then_fail)
    with pytest.raises(ModelSourceError, match="unsupported architecture"):
        gguf_to_hf(tiny_gguf_path, cache_dir=tmp_path)
    assert list((tmp_path / "hf").iterdir()) == []


def test_rejects_non_gguf(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="not a GGUF"):
        gguf_to_hf(f, cache_dir=tmp_path)
    with pytest.raises(ModelSourceError, match="Cannot read"):
        gguf_to_hf(tmp_path / "missing.gguf", cache_dir=tmp_path)


def test_fingerprint_sees_size_head_and_tail(tmp_path):
    f = tmp_path / "m.gguf"
    data = bytearray(os.urandom(3 * 1024 * 1024))
    f.write_bytes(data)
    base = gguf_fingerprint(f)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    data[-1] ^= 1
    f.write_bytes(data)
    tail = gguf_fingerprint(f)
    data[0] ^= 1
    f.write_bytes(data)
    head = gguf_fingerprint(f)
    f.write_bytes(data + b"\0")
    assert len({base, tail, head, gguf_fingerprint(f)}) == 4


def test_chat_template_read_from_gguf_metadata(tiny_gguf_path, tiny_hf_dir):
    from transformers import AutoTokenizer

    meta = convert._read_gguf_metadata(tiny_gguf_path)
    assert meta["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(tiny_hf_dir).chat_template
    assert isinstance(meta["tokenizer.ggml.eos_token_id"], int)
    assert "tokenizer.ggml.tokens" not in meta  # the big arrays are skipped


def test_chat_template_fallback_when_loader_drops_it(tiny_gguf_path, tmp_path, monkeypatch):
    """If transformers' GGUF tokenizer loader loses the template, it is restored from metadata."""
    import transformers

    real = transformers.AutoTokenizer.from_pretrained

    def without_template(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.chat_template = None
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", without_template)
    folder = gguf_to_hf(tiny_gguf_path, cache_dir=tmp_path)
    monkeypatch.undo()
    assert "<|im_start|>" in (transformers.AutoTokenizer.from_pretrained(folder).chat_template or "")

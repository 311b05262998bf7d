"""The tiny-model fixtures are faithful: llama.cpp, transformers and the GGUF agree on everything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fixtures.tiny_models import (
    DEFAULT_SYSTEM_PROMPT,
    ENDOFTEXT,
    IM_END,
    IM_START,
    make_tiny_gguf,
    make_tiny_hf_model,
    make_tiny_tokenizer,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll say WE'RE done, don't you?",
    "  leading spaces,   runs   of spaces and trailing  ",
    "line one\nline two\n\n\nend\r\nCRLF\tand tab",
    "numbers 1234567, 3.14 and $5.99 at 10:30",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 ok",
    "mixed 中文 English 日本語 한국어 Ελληνικά Русский",
    'def f(x):\n    return x ** 2  # comment\n{"label": "positive", "score": 0.98}',
    "",
]

PROMPT_MESSAGES = [{"role": "user", "content": "Hello! 你好 😀 Classify the sentiment: I love it."}]


# --------------------------------------------------------------------------- helpers / fixtures


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def hf_logits(hf_model, prompt_ids):
    with torch.no_grad():
        return hf_model(torch.tensor([prompt_ids])).logits[0].numpy()


def _load_llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True, **kwargs)


def _llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def llm(tiny_gguf_path):
    model = _load_llama(tiny_gguf_path)
    yield model
    model.close()


# --------------------------------------------------------------------------- the fixtures themselves


def test_tokenizer_shape_and_specials(hf_tokenizer):
    tok = make_tiny_tokenizer()
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert 300 <= len(tok) <= 1000
    ids = tok.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END])
    assert ids == list(range(len(tok) - 3, len(tok)))  # specials at the end, like Qwen2
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT and tok.bos_token is None
    assert len(hf_tokenizer) == len(tok)
    assert hf_tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == ids
    # common English words are single multi-byte tokens; common Chinese characters are too
    for word in [" the", " assistant", " you", "Hello"]:
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode("你好")) == 2


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(hf_tokenizer, text):
    fresh = make_tiny_tokenizer()
    ids = fresh.encode(text)
    assert hf_tokenizer.encode(text) == ids  # the saved/reloaded tokenizer is the same one
    assert fresh.decode(ids) == text
    assert hf_tokenizer.decode(ids) == text


def test_chat_template(hf_tokenizer):
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    text = hf_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
    )
    ids = hf_tokenizer(text)["input_ids"]
    assert ids.count(hf_tokenizer.convert_tokens_to_ids(IM_START)) == 3


def test_hf_dir_contents(tiny_hf_dir, hf_model, hf_tokenizer):
    assert (tiny_hf_dir / "model.safetensors").is_file()
    gen = json.loads((tiny_hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == hf_tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    cfg = hf_model.config
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(hf_tokenizer)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.tie_word_embeddings is False
    assert all(p.dtype == torch.float32 for p in hf_model.parameters())


def test_hf_model_is_deterministic_per_seed(tmp_path, tiny_hf_dir):
    a = make_tiny_hf_model(tmp_path / "a", seed=0)
    b = make_tiny_hf_model(tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() == (tiny_hf_dir / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (tiny_hf_dir / "tokenizer.json").read_bytes()
    assert (b / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_hf_model_is_not_degenerate(hf_logits):
    # Logits on a useful scale and a spread-out but not flat next-token distribution.
    probs = torch.softmax(torch.from_numpy(hf_logits), dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    assert 1.0 < float(hf_logits.std()) < 10.0
    assert 1.0 < entropy < np.log(hf_logits.shape[-1]) - 0.5
    assert len(set(hf_logits.argmax(-1).tolist())) > 3  # the prediction depends on the context


def test_hf_generate_stops_on_im_end(hf_model, prompt_ids, hf_tokenizer):
    out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(prompt_ids)
    assert hf_model.generation_config.eos_token_id == hf_tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])


# --------------------------------------------------------------------------- (a) llama.cpp logits


def test_llama_cpp_logits_match_transformers(llm, prompt_ids, hf_logits):
    """Default context (F16 KV cache): agreement to ~1e-3 of the logit scale."""
    got = _llama_logits(llm, prompt_ids)
    scale = float(np.abs(hf_logits).max())
    diff = float(np.abs(got - hf_logits).max())
    print(f"llama.cpp (f16 KV) vs transformers: max|diff|={diff:.3g}, max|logit|={scale:.3g}")
    assert diff < 1e-3 * scale
    assert (got.argmax(-1) == hf_logits.argmax(-1)).all()


def test_llama_cpp_logits_match_transformers_f32_kv(tiny_gguf_path, prompt_ids, hf_logits):
    """With an F32 KV cache the two implementations agree to float32 rounding."""
    import llama_cpp

    model = _load_llama(tiny_gguf_path, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        diff = float(np.abs(_llama_logits(model, prompt_ids) - hf_logits).max())
    finally:
        model.close()
    print(f"llama.cpp (f32 KV) vs transformers: max|diff|={diff:.3g}")
    assert diff < 1e-4


def _llama_style_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The q/k row interleaving llama.cpp's converter applies to LLaMA (not NEOX-rope) models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_logit_comparison_catches_a_qk_permutation(tiny_hf_dir, tmp_path, prompt_ids, hf_logits):
    """Sanity check of the test above: the model is sensitive enough that a wrong q/k layout shows."""
    from safetensors.numpy import load_file, save_file

    bad_dir = tmp_path / "bad_hf"
    shutil.copytree(tiny_hf_dir, bad_dir)
    cfg = json.loads((bad_dir / "config.json").read_text())
    weights = load_file(str(bad_dir / "model.safetensors"))
    for name in list(weights):
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        for proj, n_head in heads.items():
            if f".{proj}." in name:
                weights[name] = np.ascontiguousarray(_llama_style_permute(weights[name], n_head))
    save_file(weights, str(bad_dir / "model.safetensors"), metadata={"format": "pt"})
    model = _load_llama(make_tiny_gguf(bad_dir, tmp_path / "bad.gguf"))
    try:
        diff = float(np.abs(_llama_logits(model, prompt_ids) - hf_logits).max())
    finally:
        model.close()
    assert diff > 0.1


# --------------------------------------------------------------------------- (b) llama.cpp tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenization_matches_hf(llm, hf_tokenizer, text):
    ids = hf_tokenizer.encode(text)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode("utf-8") == text


def test_llama_cpp_special_tokens(llm, hf_tokenizer):
    im_start = hf_tokenizer.convert_tokens_to_ids(IM_START)
    assert llm.tokenize(IM_START.encode(), add_bos=False, special=True) == [im_start]
    # with special=False the marker is plain text, as with HF's split_special_tokens=True
    split = llm.tokenize(IM_START.encode(), add_bos=False, special=False)
    assert len(split) > 1 and im_start not in split
    assert split == hf_tokenizer(IM_START, split_special_tokens=True)["input_ids"]

    chat = hf_tokenizer.apply_chat_template(PROMPT_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf_tokenizer.encode(chat)
    assert llm.tokenize(b"hi", add_bos=True, special=False) == hf_tokenizer.encode("hi")  # add_bos_token=False


# --------------------------------------------------------------------------- (c) llama.cpp EOG / metadata


def test_llama_cpp_end_of_generation(llm, hf_tokenizer):
    import llama_cpp

    eot, im_start, im_end = hf_tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END])
    assert llm.token_eos() == im_end
    assert llm.token_bos() == eot
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end)
    assert llama_cpp.llama_vocab_is_eog(vocab, eot)
    assert not llama_cpp.llama_vocab_is_eog(vocab, im_start)
    assert llm.n_vocab() == len(hf_tokenizer)
    assert llm.metadata["tokenizer.chat_template"] == hf_tokenizer.chat_template
    assert llm.metadata["general.architecture"] == "qwen2"


# --------------------------------------------------------------------------- (d) transformers reads the GGUF


def test_transformers_reads_gguf_tokenizer(tiny_gguf_path, hf_tokenizer):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gguf_path.parent, gguf_file=tiny_gguf_path.name)
    assert len(tok) == len(hf_tokenizer)
    assert (tok.eos_token, tok.pad_token) == (IM_END, ENDOFTEXT)
    assert tok.chat_template == hf_tokenizer.chat_template
    for text in TEXTS + [IM_START + "user\nhi" + IM_END]:
        assert tok.encode(text) == hf_tokenizer.encode(text), text


def test_transformers_reads_gguf_model(tiny_gguf_path, prompt_ids, hf_logits):
    pytest.importorskip("accelerate", reason="transformers needs `accelerate` to load a GGUF file")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_gguf_path.parent, gguf_file=tiny_gguf_path.name, dtype=torch.float32
    ).eval()
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings is False
    with torch.no_grad():
        got = model(torch.tensor([prompt_ids])).logits[0].numpy()
    diff = float(np.abs(got - hf_logits).max())
    print(f"transformers-from-GGUF vs transformers: max|diff|={diff:.3g}")
    assert diff < 1e-5

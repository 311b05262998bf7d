"""transformers (PyTorch) backend: HF model folders and Hub ids, FP32 by default.

A GGUF file is converted once to a safetensors folder (see :func:`allinone.models.gguf_to_hf`)
before it gets here. Every sequence has its own ``DynamicCache``; which ones stay cached is
decided by :class:`~allinone.backends.kv_cache.KVPool` as on llama.cpp. Sequences are computed
one after another (PyTorch on CPU gains little from batching decode steps of a 0.5B model);
classification prompts are micro-batched as one padded batch (:meth:`score_batch`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import BackendUnavailableError, InvalidInputError
from .base import Backend
from .chat_template import ChatTemplate
from .kv_cache import KVPool

_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<end_of_turn>")


class TransformersBackend(Backend):
    """A causal LM on PyTorch.

    Args:
        model_dir: a Hugging Face model folder (config.json, safetensors, tokenizer files).
        dtype: "float32" (default, as in the original design), "bfloat16" or "float16".
        n_ctx: context window in tokens; default: the model's ``max_position_embeddings``
            capped at 8192.
        n_threads: torch intra-op threads; default: all cores.
        kv_cache_mb: megabytes of KV cache kept over all sequences, cached and running.

    Raises:
        BackendUnavailableError: torch/transformers missing or the folder cannot be loaded.
    """

    name = "transformers"

    def __init__(self, model_dir: Path, *, dtype: str = "float32", n_ctx: int | None = None,
                 n_threads: int | None = None, kv_cache_mb: float = 128, model_id: str | None = None) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendUnavailableError(
                "the transformers backend needs torch and transformers: pip install 'allinone[transformers]'"
            ) from exc
        self._torch = torch
        torch.set_num_threads(n_threads or os.cpu_count() or 1)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        except (OSError, ValueError) as exc:
            raise BackendUnavailableError(f"transformers could not load {model_dir}: {exc}") from exc
        self.model.eval()
        self.model_id = model_id or Path(model_dir).name
        max_pos = getattr(self.model.config, "max_position_embeddings", 8192) or 8192
        self.n_ctx = n_ctx or min(int(max_pos), 8192)
        self.eos_token_ids = frozenset(self._end_token_ids())
        tok = self.tokenizer
        self.chat_template = ChatTemplate(
            tok.chat_template if isinstance(tok.chat_template, str) else None,
            bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
        )
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        layers = self.model.config.num_hidden_layers
        kv_heads = getattr(self.model.config, "num_key_value_heads", None) or self.model.config.num_attention_heads
        head_dim = getattr(self.model.config, "head_dim", None) or self.model.config.hidden_size // self.model.config.num_attention_heads
        #: bytes of keys + values per token over all layers, in the model's dtype
        self.kv_bytes_per_token = layers * kv_heads * head_dim * 2 * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        capacity = max(self.n_ctx, int(kv_cache_mb * 2**20 // self.kv_bytes_per_token))
        self.kv = KVPool(self, capacity_tokens=capacity, max_entries=64)
        # transformers 5 renamed the forward argument `past_key_values` to `cache`.
        params = inspect.signature(self.model.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _end_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for value in (eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(int(v) for v in value)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _TURN_TOKENS if t in vocab)
        return ids

    # -- tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not special))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- KV store (see kv_cache.KVStore): one DynamicCache per sequence ------------------------
    def kv_new(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def kv_copy(self, src, dst, n: int) -> None:
        for i, layer in enumerate(src.layers):
            dst.update(layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone(), i)

    def kv_free(self, handle) -> None:
        pass  # the cache's tensors are freed with the last reference

    # -- compute ------------------------------------------------------------------------
    def _forward(self, entries, new_tokens, all_logits):
        torch = self._torch
        out = []
        with torch.inference_mode():
            for entry, new in zip(entries, new_tokens):
                start = len(entry.tokens)
                ids = torch.tensor([list(new)], dtype=torch.long)
                positions = torch.arange(start, start + len(new), dtype=torch.long).unsqueeze(0)
                hidden = self.model.model(input_ids=ids, position_ids=positions, use_cache=True,
                                          **{self._cache_arg: entry.handle}).last_hidden_state[0]
                logits = self.model.lm_head(hidden if all_logits else hidden[-1])
                out.append(logits.float().numpy())
        return out

    def _llguidance_tokenizer(self):
        import llguidance.hf

        n_vocab = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0))
        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=sorted(self.eos_token_ids))

    def close(self) -> None:
        self.kv.clear()
        self.model = None


"""transformers (PyTorch) backend: HF model folders and Hub ids, FP32 by default.

A GGUF file is converted once to a safetensors folder (see :func:`allinone.models.gguf_to_hf`)
before it gets here. Like the llama.cpp backend, the KV cache of the last sequence is kept
between calls and only the tokens after the longest shared prefix are computed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import BackendUnavailableError, InvalidInputError
from . import constrained
from .base import Backend, SamplingParams
from .chat_template import ChatTemplate

_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<end_of_turn>")


class TransformersBackend(Backend):
    """A causal LM on PyTorch.

    Args:
        model_dir: a Hugging Face model folder (config.json, safetensors, tokenizer files).
        dtype: "float32" (default, as in the original design), "bfloat16" or "float16".
        n_ctx: context window in tokens; default: the model's ``max_position_embeddings``
            capped at 8192.
        n_threads: torch intra-op threads; default: all cores.

    Raises:
        BackendUnavailableError: torch/transformers missing or the folder cannot be loaded.
    """

    name = "transformers"

    def __init__(self, model_dir: Path, *, dtype: str = "float32", n_ctx: int | None = None,
                 n_threads: int | None = None, model_id: str | None = None) -> None:
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
        self._cache = None
        self._cache_ids: list[int] = []
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

    # -- compute ------------------------------------------------------------------------
    def _forward_to(self, ids: Sequence[int]):
        """Bring the kept KV cache to exactly ``ids``; return the last position's logits (vocab,)."""
        torch = self._torch
        if len(ids) >= self.n_ctx:
            raise InvalidInputError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        n = 0
        limit = min(len(self._cache_ids), len(ids) - 1)
        while n < limit and self._cache_ids[n] == ids[n]:
            n += 1
        if self._cache is None or n == 0:
            self._cache = self._new_cache()
            n = 0
        elif len(self._cache_ids) > n:
            self._cache.crop(-(len(self._cache_ids) - n))
        new = torch.tensor([list(ids[n:])], dtype=torch.long)
        positions = torch.arange(n, len(ids), dtype=torch.long).unsqueeze(0)
        with torch.inference_mode():
            out = self.model.model(input_ids=new, position_ids=positions, use_cache=True,
                                   **{self._cache_arg: self._cache})
            hidden = out.last_hidden_state[0, -1]
            logits = self.model.lm_head(hidden)
        # the DynamicCache object is updated in place
        self._cache_ids = list(ids)
        return logits.float()

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def score(self, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        if not prefix_ids:
            raise InvalidInputError("score needs a non-empty prefix")
        torch = self._torch
        prefix = list(prefix_ids)
        first = torch.log_softmax(self._forward_to(prefix), dim=-1)
        out = []
        for cont in continuations:
            cont = list(cont)
            total = float(first[cont[0]])
            for j in range(1, len(cont)):
                step = torch.log_softmax(self._forward_to(prefix + cont[:j]), dim=-1)
                total += float(step[cont[j]])
            out.append(total)
        return out

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                 json_schema: dict | None = None) -> Iterator[int]:
        torch = self._torch
        ids = list(prompt_ids)
        if len(ids) >= self.n_ctx:
            raise InvalidInputError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        matcher = self._matcher(json_schema) if json_schema is not None else None
        rng = torch.Generator()
        rng.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
        logits = self._forward_to(ids)
        while True:
            if matcher is not None:
                logits = self._apply_mask(logits, matcher)
            tok = _sample(torch, logits, sampling, ids, rng)
            if matcher is not None and tok not in self.eos_token_ids and not matcher.consume_token(tok):
                raise RuntimeError(f"constrained decoding failed: {matcher.get_error()}")  # pragma: no cover
            yield tok
            if len(ids) + 1 >= self.n_ctx:
                return
            ids.append(tok)
            logits = self._forward_to(ids)

    # -- constrained decoding (llguidance, see .constrained) --------------------------------
    def _matcher(self, schema: dict):
        if getattr(self, "_constrainer", None) is None:
            if not constrained.available():  # pragma: no cover - depends on the install
                raise BackendUnavailableError(
                    "JSON-constrained decoding on the transformers backend needs llguidance: "
                    "pip install 'allinone[transformers]'"
                )
            import llguidance.hf

            n_vocab = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0))
            self._constrainer = constrained.JsonConstrainer(
                lambda: llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=sorted(self.eos_token_ids))
            )
        return self._constrainer.matcher(schema)

    def _apply_mask(self, logits, matcher):
        """``logits`` with every token the grammar forbids set to -inf."""
        torch = self._torch
        allowed = torch.from_numpy(constrained.allowed_tokens(matcher, logits.shape[-1]))
        return torch.where(allowed, logits, torch.full_like(logits, float("-inf")))

    def close(self) -> None:
        self._cache = None
        self.model = None


def _sample(torch, logits, sampling: SamplingParams, history: list[int], rng) -> int:
    """Pick the next token: repetition penalty, then greedy or temperature/top-k/top-p sampling."""
    logits = logits.clone()
    if sampling.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history[-64:])), dtype=torch.long)  # window as llama.cpp's default
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / sampling.repetition_penalty, vals * sampling.repetition_penalty)
    if sampling.greedy:
        return int(torch.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < sampling.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=rng))

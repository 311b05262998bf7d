"""llama.cpp backend (llama-cpp-python) for GGUF models: the default for the embedded model.

Uses the high-level ``Llama`` object for loading, tokenizing and sampling, and keeps its KV
cache across calls: every evaluation first drops only the tokens that differ from what the
cache already holds, so a task's fixed prompt prefix and a conversation's history are not
recomputed when the next request shares them.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError
from . import constrained
from .base import Backend, SamplingParams
from .chat_template import ChatTemplate

_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)
_STRICT_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'

# Control tokens that also end a reply when the model emits them (a new turn means the reply is over).
_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<end_of_turn>")


class LlamaCppBackend(Backend):
    """A GGUF model on llama.cpp.

    Args:
        gguf_path: the model file.
        n_ctx: context window in tokens (prompt + completion).
        n_threads: CPU threads; default: all cores.
        model_id: display id.

    Raises:
        BackendUnavailableError: llama-cpp-python is not installed.
        InvalidInputError: the file cannot be loaded.
    """

    name = "llamacpp"

    def __init__(self, gguf_path: Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 512, model_id: str | None = None) -> None:
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendUnavailableError(
                "the llamacpp backend needs llama-cpp-python: pip install 'allinone[llamacpp]'"
            ) from exc
        self._lib = llama_cpp
        threads = n_threads or os.cpu_count() or 1
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=n_batch, logits_all=False, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise BackendUnavailableError(f"llama.cpp could not load {gguf_path}: {exc}") from exc
        self.model_id = model_id or Path(gguf_path).stem
        self._grammars: dict[str, object] = {}
        #: "llguidance" (token mask from llguidance, when installed) or "gbnf" (llama.cpp grammar
        #: from llama-cpp-python's JSON-schema converter); the mask is much cheaper per token
        self.constrain_with = "llguidance" if constrained.available() else "gbnf"
        self._constrainer = None
        self.n_ctx = self.llm.n_ctx()
        self._n_vocab = self.llm.n_vocab()
        meta = self.llm.metadata
        vocab = self.llm._model.vocab
        eog = {t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        for text in _TURN_TOKENS:
            ids = self.tokenize(text, special=True)
            if len(ids) == 1 and self.tokenize(text, special=False) != ids:
                eog.add(ids[0])
        self.eos_token_ids = frozenset(eog)
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        token_text = lambda key: (  # noqa: E731
            self.llm.detokenize([int(meta[key])], special=True).decode("utf-8", "replace") if key in meta else ""
        )
        self.chat_template = ChatTemplate(
            meta.get("tokenizer.chat_template"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
        )

    # -- tokens -------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        if not text:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        # special=False: control tokens (<|im_end|>, ...) never leak into reply text.
        return self.llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def render_chat(self, messages, *, add_generation_prompt: bool = True) -> list[int]:
        ids = super().render_chat(messages, add_generation_prompt=add_generation_prompt)
        if self._add_bos and self.llm.token_bos() >= 0:
            ids = [self.llm.token_bos(), *ids]
        return ids

    # -- compute ------------------------------------------------------------------------
    def _eval_to(self, ids: Sequence[int]) -> np.ndarray:
        """Make the KV cache hold exactly ``ids`` and return the logits after the last one.

        Returns:
            float32 array of shape (n_vocab,).
        """
        if len(ids) >= self.n_ctx:
            raise InvalidInputError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        cached = self.llm.input_ids[: self.llm.n_tokens]
        n = 0
        limit = min(len(cached), len(ids) - 1)  # at least one token is evaluated to get fresh logits
        while n < limit and cached[n] == ids[n]:
            n += 1
        self.llm.n_tokens = n  # Llama.eval drops the KV entries from position n on
        self.llm.eval(list(ids[n:]))
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self._n_vocab,))
        return logits.copy()

    def score(self, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        if not prefix_ids:
            raise InvalidInputError("score needs a non-empty prefix")
        prefix = list(prefix_ids)
        first = _log_softmax(self._eval_to(prefix))
        out = []
        for cont in continuations:
            cont = list(cont)
            total = float(first[cont[0]])
            for j in range(1, len(cont)):
                total += float(_log_softmax(self._eval_to(prefix + cont[:j]))[cont[j]])
            out.append(total)
        return out

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                 json_schema: dict | None = None) -> Iterator[int]:
        prompt = list(prompt_ids)
        if len(prompt) >= self.n_ctx:
            raise InvalidInputError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        if json_schema is not None and self.constrain_with == "llguidance":
            yield from self._generate_llguidance(prompt, sampling, json_schema)
            return
        grammar = self._grammar(json_schema) if json_schema is not None else None
        self.llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
        stream = self.llm.generate(
            prompt,
            temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or self._n_vocab,
            min_p=0.0, typical_p=1.0, repeat_penalty=sampling.repetition_penalty, reset=True,
            grammar=grammar,
        )
        try:
            for tok in stream:
                yield int(tok)
                # The sampled token is evaluated lazily on the next step; leave room for it.
                if self.llm.n_tokens + 1 >= self.n_ctx:
                    return
        finally:
            stream.close()

    def _generate_llguidance(self, prompt: list[int], sampling: SamplingParams, schema: dict) -> Iterator[int]:
        """Constrained decoding with llguidance's token mask on the logits; sampling in numpy
        with the same rules as the transformers backend."""
        if self._constrainer is None:
            import llguidance.llamacpp

            vocab = self.llm._model.vocab

            def make_tokenizer():
                # llguidance's helper calls a llama-cpp-python function that warns it is
                # deprecated, once per token: keep those 150k warnings out of the caller's log.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return llguidance.llamacpp.lltokenizer_from_vocab(
                        vocab, n_vocab=self._n_vocab, eos_token=sorted(self.eos_token_ids))

            self._constrainer = constrained.JsonConstrainer(make_tokenizer)
        matcher = self._constrainer.matcher(schema)
        rng = np.random.default_rng(sampling.seed)
        ids = list(prompt)
        logits = self._eval_to(ids)
        while True:
            allowed = constrained.allowed_tokens(matcher, self._n_vocab)
            tok = _sample(np.where(allowed, logits, -np.inf), sampling, ids, rng)
            if tok not in self.eos_token_ids and not matcher.consume_token(tok):
                raise RuntimeError(f"constrained decoding failed: {matcher.get_error()}")  # pragma: no cover
            yield tok
            if len(ids) + 1 >= self.n_ctx:
                return
            ids.append(tok)
            logits = self._eval_to(ids)

    def _grammar(self, schema: dict):
        """A GBNF grammar for ``schema`` (llama.cpp's JSON-schema converter), cached by schema."""
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            try:
                gbnf = json_schema_to_gbnf(key)
            except Exception as exc:  # the converter raises plain exceptions on schemas it cannot do
                raise InvalidInputError(f"cannot turn this JSON schema into a grammar: {exc}") from exc
            # The converter's string character rule lets raw control characters (e.g. a newline)
            # into strings, which strict JSON forbids; use the rule of llama.cpp's own converter.
            gbnf = _CHAR_RULE.sub(lambda _: _STRICT_CHAR_RULE, gbnf)
            grammar = self._lib.LlamaGrammar.from_string(gbnf, verbose=False)
            if len(self._grammars) >= 32:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = grammar
        return grammar

    def close(self) -> None:
        self.llm.close()


def _sample(logits: np.ndarray, sampling: SamplingParams, history: list[int], rng: np.random.Generator) -> int:
    """Repetition penalty, then greedy or temperature/top-k/top-p sampling (numpy)."""
    logits = logits.astype(np.float64)
    if sampling.repetition_penalty != 1.0 and history:
        seen = np.array(sorted(set(history[-64:])), dtype=np.int64)
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / sampling.repetition_penalty, vals * sampling.repetition_penalty)
    if sampling.greedy:
        return int(np.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.size:
        kth = np.partition(logits, -sampling.top_k)[-sampling.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - np.max(logits))
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        sorted_p = probs[order]
        keep = np.cumsum(sorted_p) - sorted_p < sampling.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - np.log(np.exp(shifted).sum())

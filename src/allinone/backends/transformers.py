"""transformers (PyTorch) backend: HF model folders and Hub ids, FP32 by default.

A GGUF file is converted once to a safetensors folder (see :func:`allinone.models.gguf_to_hf`)
before it gets here. Every sequence has its own ``DynamicCache``; which ones stay cached is
decided by :class:`~allinone.backends.kv_cache.KVPool` as on llama.cpp. Generation steps compute
their sequences one after another (PyTorch on CPU gains little from batching decode steps of a
0.5B model); classification prompts are computed as one padded batch
(:meth:`TransformersBackend.score_batch`), and with ``relative=True`` only the output-head rows of
the labels' first tokens are computed.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError
from .base import Backend, ScoreRequest
from .chat_template import ChatTemplate
from .kv_cache import KVEntry, KVPool

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
        batch_invariant: see :attr:`Backend.batch_invariant`. Here: no padded batches for
            scoring (each prompt in its own forward pass, as every other path already is).

    Raises:
        BackendUnavailableError: torch/transformers missing or the folder cannot be loaded.
    """

    name = "transformers"
    #: :meth:`score_batch` limits per forward pass: padded new-token positions (rows x longest new part)
    score_batch_tokens = 2048
    #: :meth:`score_batch`: a forward pass may pad at most this fraction of its real tokens ...
    score_pad_waste = 0.25
    #: ... or at least this many positions (padding a few short prompts costs nothing)
    score_pad_slack = 64

    def __init__(self, model_dir: Path, *, dtype: str = "float32", n_ctx: int | None = None,
                 n_threads: int | None = None, kv_cache_mb: float = 128, model_id: str | None = None,
                 batch_invariant: bool = False) -> None:
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
        self.n_layer = int(self.model.config.num_hidden_layers)
        self.hidden_size = int(self.model.config.hidden_size)
        layers = self.model.config.num_hidden_layers
        kv_heads = getattr(self.model.config, "num_key_value_heads", None) or self.model.config.num_attention_heads
        head_dim = getattr(self.model.config, "head_dim", None) or self.model.config.hidden_size // self.model.config.num_attention_heads
        #: bytes of keys + values per token over all layers, in the model's dtype
        self.kv_bytes_per_token = layers * kv_heads * head_dim * 2 * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        capacity = max(self.n_ctx, int(kv_cache_mb * 2**20 // self.kv_bytes_per_token))
        self.batch_invariant = batch_invariant
        self.kv = KVPool(self, capacity_tokens=capacity, max_entries=64, declared_only=batch_invariant)
        # transformers 5 renamed the forward argument `past_key_values` to `cache`.
        params = inspect.signature(self.model.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Batched scoring builds caches from (batch, heads, positions, head_dim) tensors holding every
        # position; a sliding-window layer keeps only the last window: use the generic path then.
        self._batched_scoring = not batch_invariant and not any(getattr(self.kv_new(), "is_sliding", ()) or ())

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
    def _forward(self, entries, new_tokens, *, all_logits, layers=(), logits=True, last_states=False):
        torch = self._torch
        out_logits, out_states = [], []
        with torch.inference_mode():
            for entry, new in zip(entries, new_tokens):
                start = len(entry.tokens)
                ids = torch.tensor([list(new)], dtype=torch.long)
                positions = torch.arange(start, start + len(new), dtype=torch.long).unsqueeze(0)
                result = self.model.model(input_ids=ids, position_ids=positions, use_cache=True,
                                          output_hidden_states=bool(layers), **{self._cache_arg: entry.handle})
                hidden = result.last_hidden_state[0]
                if logits:
                    out_logits.append(self.model.lm_head(hidden if all_logits else hidden[-1]).float().numpy())
                if layers:
                    # hidden_states[i]: after i blocks (0 = embeddings); the last one is normalized
                    rows = slice(-1, None) if last_states else slice(None)
                    out_states.append(torch.stack([result.hidden_states[x][0, rows] for x in layers]).float().numpy())
        return (out_logits if logits else None), (out_states if layers else None)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        decoder = _byte_decoder()
        pieces = self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        out = []
        for tok, piece in zip(ids, pieces):
            if piece is not None and all(ch in decoder for ch in piece):
                out.append(bytes(decoder[ch] for ch in piece))  # a byte-level BPE piece
            else:
                out.append(self.tokenizer.decode([int(tok)]).encode("utf-8"))
        return out

    # -- batched scoring (classification) ---------------------------------------------------
    def score_batch_hidden(self, requests, layers, *, relative=False, keep=True):
        # hidden states come from the one-sequence-at-a-time path of the base class
        if layers or not self._batched_scoring:
            return super().score_batch_hidden(requests, layers, relative=relative, keep=keep)
        return self.score_batch(requests, relative=relative, keep=keep), None

    def score_batch(self, requests: Sequence[ScoreRequest], *, relative: bool = False,
                    keep: bool = True) -> list[list[float]]:
        """:meth:`Backend.score_batch` with the prompts computed as padded batches.

        What is batched: every request starts from its longest cached prefix (``self.kv``, as in
        the base class); the uncached rest of all prompts goes through the model as ONE padded
        forward pass, rows (batch) x longest rest (positions), however many cached prefixes they
        start from. Row ``b``'s attention sees its cached prefix (``P_b`` positions, copied from
        its KV entry into a (rows, heads, max P_b, head_dim) batch cache; rows with a shorter
        prefix are zero-filled and masked after it), then its own tokens, right-padded; its
        position ids are ``P_b + arange``, and its logits are taken at its last real token. The
        inner tokens of all multi-token continuations go through a second padded forward pass
        on a copy of their prompt's rows of that batch cache (mask and positions built the same
        way), then the full output head and log-softmax at their real positions.

        A call is split into several such passes only when one would be too big or too padded:
        at most :attr:`score_batch_tokens` padded new positions, at most :attr:`score_pad_waste`
        of padding (or :attr:`score_pad_slack` positions), at most the pool's capacity in KV
        positions for the batch cache (rows are sorted by length, longest first).

        Output head: with ``relative=False`` the full head and an exact log-softmax over the
        vocabulary. With ``relative=True``, for the first token of the continuations only
        ``hidden @ W[rows].T (+ bias[rows])`` is computed, rows = the distinct first tokens of
        the batch's continuations: a first-token score is then its logit, i.e. its log-prob plus
        the request's log-normalizer, one constant per request (as documented in the base
        class). Inner tokens always get the exact log-softmax.

        Guarantee: the scores equal the one-sequence-at-a-time computation (:meth:`_forward`,
        the base class) within float tolerance (only the summation order differs: a few 1e-6
        in FP32), and with ``relative=True`` up to one constant per request.

        KV pool: the same state as the base implementation leaves. Entries are acquired as
        there (same counters, same shared prefix entries created); a request that started from
        a cached prefix of at least ``min_shared`` tokens gives its entry back at once (the base
        class frees it after the call: only the prefix stays cached); any other keeps its entry,
        which gets the prompt's keys and values from the batch cache and stays cached, as in
        the base class. So only one per-request copy of a cached prefix is counted in the pool
        at a time (the base class holds them all at once, and a batch of B prompts needs
        B x the prefix in budget). The batch caches are transient: they are not counted in the
        pool's budget, and each is bounded by it as said above.

        Args/Returns/Raises: as :meth:`Backend.score_batch` (``keep=False``: no entry is kept).
        """
        if not self._batched_scoring:
            return super().score_batch(requests, relative=relative, keep=keep)
        requests = [(list(p), [list(c) for c in conts]) for p, conts in requests]
        self._check_score_requests(requests)
        if len(requests) > 1:
            self._cache_common_prefix([p for p, _ in requests])
        scores = [[0.0] * len(conts) for _, conts in requests]
        rows: list[_Row] = []
        pasts: dict[tuple[int, ...], Any] = {}  # one copy of each distinct cached prefix
        held: list[KVEntry] = []
        torch = self._torch
        try:
            with torch.inference_mode():
                for i, (prefix, _) in enumerate(requests):
                    entry, n = self.kv.acquire(prefix)
                    key = tuple(prefix[:n])
                    if key not in pasts:
                        pasts[key] = [(layer.keys[..., :n, :], layer.values[..., :n, :])
                                      for layer in entry.handle.layers] if n else None
                    kept = keep and n < self.kv.min_shared  # as in Backend.score_batch
                    if kept:
                        held.append(entry)
                    else:
                        self.kv.release(entry, keep=False)
                    rows.append(_Row(i, n, pasts[key], prefix[n:], entry if kept else None))
                del pasts
                self.kv.reserve(sum(len(r.new) for r in rows if r.entry is not None), keep=held)
                for batch in self._split(rows, lambda r: len(r.new), lambda r: r.n):
                    self._score_rows(batch, requests, scores, relative)
            return scores
        finally:
            for entry in held:
                self.kv.release(entry, keep=bool(entry.tokens))

    def _score_rows(self, batch: list["_Row"], requests: list[ScoreRequest], scores: list[list[float]],
                    relative: bool) -> None:
        """One padded forward pass for the prompts in ``batch``, their first-token scores, their
        kept entries' KV, then the inner tokens of their multi-token continuations."""
        torch = self._torch
        n_rows = len(batch)
        lens = [len(r.new) for r in batch]
        p_max, s_max = max(r.n for r in batch), max(lens)
        ids = torch.zeros((n_rows, s_max), dtype=torch.long)
        mask = torch.zeros((n_rows, p_max + s_max), dtype=torch.long)
        positions = torch.zeros((n_rows, s_max), dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : lens[b]] = torch.tensor(r.new, dtype=torch.long)
            mask[b, : r.n] = 1
            mask[b, p_max: p_max + lens[b]] = 1
            positions[b] = torch.arange(r.n, r.n + s_max)
        cache = self._batch_cache([r.past for r in batch], [r.n for r in batch], p_max)
        hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                  **{self._cache_arg: cache}).last_hidden_state  # (rows, s_max, hidden)
        last = hidden[torch.arange(n_rows), torch.tensor(lens) - 1]  # (rows, hidden)
        del hidden

        # first tokens
        head = self.model.lm_head
        if relative:
            firsts = sorted({c[0] for r in batch for c in requests[r.i][1]})
            col = {t: k for k, t in enumerate(firsts)}
            rows_idx = torch.tensor(firsts, dtype=torch.long)
            bias = head.bias[rows_idx] if getattr(head, "bias", None) is not None else None
            first = torch.nn.functional.linear(last, head.weight[rows_idx], bias).float()  # (rows, labels)
            for b, r in enumerate(batch):
                scores[r.i] = [float(first[b, col[c[0]]]) for c in requests[r.i][1]]
        else:
            first = torch.log_softmax(head(last).float(), dim=-1)  # (rows, n_vocab)
            for b, r in enumerate(batch):
                scores[r.i] = [float(first[b, c[0]]) for c in requests[r.i][1]]
        del first, last

        # kept entries: their prompt's keys and values, from the batch cache
        for b, r in enumerate(batch):
            if r.entry is None:
                continue
            try:
                for li, layer in enumerate(cache.layers):
                    r.entry.handle.update(layer.keys[b: b + 1, :, p_max: p_max + lens[b], :],
                                          layer.values[b: b + 1, :, p_max: p_max + lens[b], :], li)
            except BaseException:
                r.entry.tokens = []  # half-written: never reuse it
                raise
            r.entry.tokens.extend(r.new)

        # inner tokens of multi-token continuations, in copies of their prompt's rows
        inner = [(b, j, c) for b, r in enumerate(batch) for j, c in enumerate(requests[r.i][1]) if len(c) > 1]
        for group in self._split(inner, lambda t: len(t[2]) - 1, lambda t: p_max + s_max):
            idx = torch.tensor([b for b, _, _ in group], dtype=torch.long)
            c_max = max(len(c) - 1 for _, _, c in group)
            ids = torch.zeros((len(group), c_max), dtype=torch.long)
            cont_mask = torch.zeros((len(group), c_max), dtype=torch.long)
            positions = torch.zeros((len(group), c_max), dtype=torch.long)
            for g, (b, _, c) in enumerate(group):
                ids[g, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                cont_mask[g, : len(c) - 1] = 1
                start = batch[b].n + lens[b]
                positions[g] = torch.arange(start, start + c_max)
            sub = self.kv_new()
            for li, layer in enumerate(cache.layers):
                sub.update(layer.keys.index_select(0, idx), layer.values.index_select(0, idx), li)
            hidden = self.model.model(input_ids=ids, attention_mask=torch.cat([mask[idx], cont_mask], dim=1),
                                      position_ids=positions, use_cache=True,
                                      **{self._cache_arg: sub}).last_hidden_state  # (group, c_max, hidden)
            del sub
            real = cont_mask.bool()
            logp = torch.log_softmax(head(hidden[real]).float(), dim=-1)  # (real positions, n_vocab)
            targets = torch.tensor([t for _, _, c in group for t in c[1:]], dtype=torch.long)
            picked = logp[torch.arange(len(targets)), targets].tolist()
            k = 0
            for b, j, c in group:
                scores[batch[b].i][j] += sum(picked[k: k + len(c) - 1])
                k += len(c) - 1

    def _batch_cache(self, pasts: list, lens: list[int], p_max: int):
        """A ``DynamicCache`` of (rows, heads, ``p_max``, head_dim) per layer: row b holds
        ``pasts[b]`` (a list of per-layer (keys, values) of ``lens[b]`` positions, or None) and
        zeros after it (masked by the caller)."""
        cache = self.kv_new()
        if p_max == 0:
            return cache
        n_rows = len(pasts)
        proto = next(p for p in pasts if p is not None)
        shared = all(p is proto for p in pasts)  # the common case: one task's prefix
        for li, (k0, v0) in enumerate(proto):
            if shared:
                keys, values = k0.expand(n_rows, -1, -1, -1), v0.expand(n_rows, -1, -1, -1)
            else:
                shape = (n_rows, k0.shape[1], p_max, k0.shape[3])
                keys = k0.new_zeros(shape)
                values = v0.new_zeros((n_rows, v0.shape[1], p_max, v0.shape[3]))
                for b, (past, n) in enumerate(zip(pasts, lens)):
                    if past is not None:
                        keys[b, :, :n] = past[li][0][0]
                        values[b, :, :n] = past[li][1][0]
            cache.update(keys, values, li)
        return cache

    def _split(self, items: list, new_len: Callable[[Any], int], past_len: Callable[[Any], int]) -> list[list]:
        """``items`` in forward batches: sorted by ``new_len``, longest first, a batch grows while
        it stays within :attr:`score_batch_tokens` padded positions, the padding allowance and
        the pool's capacity in KV positions (``rows * (longest past + longest new)``)."""
        kv_cap = max(self.kv.capacity_tokens, self.n_ctx)
        out: list[list] = []
        cur: list = []
        real = width = past = 0
        for item in sorted(items, key=new_len, reverse=True):
            n, p = new_len(item), past_len(item)
            if cur:
                rows, padded = len(cur) + 1, (len(cur) + 1) * width
                if (padded <= self.score_batch_tokens
                        and padded - (real + n) <= max(self.score_pad_waste * (real + n), self.score_pad_slack)
                        and rows * (max(past, p) + width) <= kv_cap):
                    cur.append(item)
                    real, past = real + n, max(past, p)
                    continue
                out.append(cur)
            cur, real, width, past = [item], n, n, p
        if cur:
            out.append(cur)
        return out

    def _llguidance_tokenizer(self):
        import llguidance.hf

        n_vocab = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0))
        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=sorted(self.eos_token_ids))

    def close(self) -> None:
        self.kv.clear()
        self.model = None


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet of GPT-2 and Qwen (Radford et al. 2019, ``bytes_to_unicode``):
    printable characters stand for bytes; this maps each character back to its byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


@dataclass(eq=False)
class _Row:
    """One prompt of :meth:`TransformersBackend.score_batch`: request index, cached prefix length
    and its per-layer (keys, values) (None when 0), the tokens left to compute, and the KV entry
    that keeps the prompt afterwards (None: only the prefix stays cached)."""

    i: int
    n: int
    past: Any
    new: list[int]
    entry: KVEntry | None

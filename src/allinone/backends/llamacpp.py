"""llama.cpp backend (llama-cpp-python's low-level API) for GGUF models: the default engine.

One llama.cpp context holds the KV states of many sequences at once (a *unified* KV cache:
``n_seq_max`` sequence ids sharing one pool of cells; copying a prefix from one sequence to
another only tags the cells, nothing is copied). :meth:`LlamaCppBackend._forward` puts the new
tokens of several sequences into one ``llama_batch`` and computes them in one ``llama_decode``,
asking for logits only at the positions that need them. That is how classification requests
are micro-batched and replies are decoded together (continuous batching, as llama.cpp's own
server does with its slots), while :class:`~allinone.backends.kv_cache.KVPool` decides which
sequences stay cached (task prefixes, conversations).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, KVCacheFullError
from ..types import SamplingParams
from .base import Backend, GenState
from .chat_template import ChatTemplate
from .kv_cache import KVEntry, KVPool

# llama.cpp's CPU backend runs its threads with OpenMP; libgomp spins 300,000 rounds at every
# barrier before it sleeps (hundreds of barriers per llama_decode). With another busy process on a
# small machine a spinning thread holds a core the other thread waits for: sentiment p50 went from
# 258 to 1,267 ms (4.9x) next to one busy loop on 2 cores. Measured on 2 cores, 0.5B model:
#   spin rounds        idle p50   busy p50   one-stream decode
#   300,000 (default)  258 ms     1,267 ms   24.1-25.7 tok/s
#   2,000              254 ms     515 ms     24.5 tok/s
#   500                260 ms     462 ms     22.4-22.6 tok/s
#   0 (PASSIVE)        319 ms     482 ms     -
# libgomp reads this once, when llama.cpp's library is loaded, so it is set before the import; a
# value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "2000")

# Control tokens that also end a reply when the model emits them (a new turn means the reply is over).
_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<end_of_turn>")

#: sequence ids of the llama.cpp context: cached and running sequences together
N_SEQ_MAX = 64

#: the KV handle of a greedy reply in batch-invariant mode: sequence 0 of the solo context
_SOLO = "solo"

#: the most token positions idle cached sequences may hold (beyond the most recently used one).
#: In the unified KV cache every forward pass attends over all cells in use, other sequences'
#: included (masked, but computed): on the 0.5B model a sentiment request took 192 ms with an
#: empty cache and 237 / 359 / 408 ms with 10 / 20 / 30 idle conversations of ~230 tokens
#: cached (2026-12-06, docs/engine.md). The cap keeps the task prefixes and the latest
#: conversations; an older conversation is recomputed when it comes back.
IDLE_TOKENS = 2048


class LlamaCppBackend(Backend):
    """A GGUF model on llama.cpp.

    Args:
        gguf_path: the model file.
        n_ctx: context window of one sequence in tokens (prompt + completion).
        n_threads: CPU threads; default: all cores.
        n_batch: most tokens computed in one ``llama_decode`` (longer batches are split). 256,
            not 512: llama.cpp's compute buffer grows with n_batch x the KV length attended
            over (flash attention is off); with 3,000-token prompts in the soak 512 peaked at
            1,060 MB after 300 requests, 256 at 930 MB, and 300 sentiment rows ran at 4.42
            rows/s against 4.32 (docs/reliability.md).
        kv_cache_mb: megabytes of KV cache for all sequences, cached and running (F16 keys and
            values); at least one full context window is always allocated.
        model_id: display id.
        batch_invariant: see :attr:`Backend.batch_invariant`. Here: flash attention (for a
            step of several tokens its sums run over a sequence's own cells in order, so where
            they sit in the unified cache changes nothing) and one sequence per ``llama_decode``
            (flash attention rounds differently with other tokens in the same decode). Greedy
            replies are computed in a second context of their own (the *solo* context: one
            sequence, its own KV buffer of ``n_ctx`` cells, cleared before each reply), one
            reply at a time: in the shared cache a one-token step with 512 or more cells in
            view is split by cell index over the threads and a reply's cells land wherever
            others left room, so its tokens depended on what else ran (docs/reliability.md).
            A greedy reply waits while another holds the solo context, and computes its whole
            prompt (no cached prefix).

    Raises:
        BackendUnavailableError: llama-cpp-python is not installed, or the file cannot be loaded.
    """

    name = "llamacpp"

    def __init__(self, gguf_path: Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 256, kv_cache_mb: float = 128, model_id: str | None = None,
                 batch_invariant: bool = False) -> None:
        try:
            import llama_cpp
            from llama_cpp import _internals, _logger
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise BackendUnavailableError(
                "the llamacpp backend needs llama-cpp-python: pip install 'allinone[llamacpp]'"
            ) from exc
        self._lib = llama_cpp
        _logger.set_verbose(False)  # llama.cpp's load and graph logs: errors only
        threads = n_threads or os.cpu_count() or 1
        model_params = llama_cpp.llama_model_default_params()
        # No "extra" weight buffers (repacked layouts): on CPUs with AMX (Intel Xeon 4th gen and
        # later) llama.cpp 0.3.36's AMX matrix kernel crashes (SIGSEGV in ggml_backend_amx_mul_mat)
        # as soon as a batch has more than one token, and on this project's CPUs the repacked
        # layouts measured no faster (prefill 230 vs 235 tok/s, decode 28.2 vs 28.4 tok/s).
        model_params.use_extra_bufts = False
        try:
            self._model = _internals.LlamaModel(path_model=str(gguf_path), params=model_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise BackendUnavailableError(f"llama.cpp could not load {gguf_path}: {exc}") from exc
        meta = self._model.metadata()
        self.model_id = model_id or Path(gguf_path).stem
        self.n_ctx = min(n_ctx, self._model.n_ctx_train())
        self.n_vocab = self._model.n_vocab()
        self.n_layer = llama_cpp.llama_model_n_layer(self._model.model)
        self.hidden_size = self._model.n_embd()
        self.kv_bytes_per_token = _kv_bytes_per_token(meta)
        # a tiny model's budget could mean millions of cells: cap at 16 full windows
        capacity = min(max(self.n_ctx, int(kv_cache_mb * 2**20 // self.kv_bytes_per_token)), 16 * self.n_ctx)

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = capacity
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = N_SEQ_MAX
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # Measured on this project's 2-core x86 CPU, 24 new tokens after 700 cached: 236 ms with
        # flash attention (llama.cpp's "auto" picks it on CPU) and 187 ms without; the gap grows
        # with the context, which is what conversation turns add up to.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if batch_invariant
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.batch_invariant = batch_invariant
        self._states = _StateCapture(self.n_layer, self.hidden_size)
        params.cb_eval = self._states.callback
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError as exc:
            raise BackendUnavailableError(f"llama.cpp could not create a context for {gguf_path}: {exc}") from exc
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._solo_ctx = self._solo_owner = None
        if batch_invariant:
            solo = llama_cpp.llama_context_default_params()
            solo.n_ctx = self.n_ctx
            solo.n_batch = solo.n_ubatch = n_batch
            solo.n_seq_max = 1
            solo.n_threads = solo.n_threads_batch = threads
            solo.no_perf = True
            solo.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            try:
                self._solo_ctx = _internals.LlamaContext(model=self._model, params=solo, verbose=False)
            except ValueError as exc:
                raise BackendUnavailableError(f"llama.cpp could not create a second context for {gguf_path}: {exc}") from exc
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._free_seqs = list(range(N_SEQ_MAX - 1, -1, -1))
        self.kv = KVPool(self, capacity_tokens=llama_cpp.llama_n_ctx(self._ctx.ctx), max_entries=N_SEQ_MAX,
                         copies_share=True, declared_only=batch_invariant, idle_tokens=IDLE_TOKENS)

        vocab = self._model.vocab
        eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        for text in _TURN_TOKENS:
            ids = self.tokenize(text, special=True)
            if len(ids) == 1 and self.tokenize(text, special=False) != ids:
                eog.add(ids[0])
        self.eos_token_ids = frozenset(eog)
        self._bos = self._model.token_bos() if meta.get("tokenizer.ggml.add_bos_token", "false") == "true" else -1
        token_text = lambda key: (  # noqa: E731
            self._model.detokenize([int(meta[key])], special=True).decode("utf-8", "replace") if key in meta else ""
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
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        # special=False: control tokens (<|im_end|>, ...) never leak into reply text.
        return self._model.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        out = []
        buf = ctypes.create_string_buffer(64)
        for tok in ids:
            n = self._lib.llama_token_to_piece(self._model.vocab, int(tok), buf, len(buf), 0, False)
            if n < 0:  # the piece is longer than the buffer: -n is its length
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._model.vocab, int(tok), buf, len(buf), 0, False)
            out.append(buf.raw[:n])
        return out

    @property
    def bos_ids(self) -> list[int]:
        return [self._bos] if self._bos >= 0 else []

    # -- KV store (see kv_cache.KVStore) -----------------------------------------------------
    def kv_new(self) -> int:
        seq = self._free_seqs.pop()
        self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return seq

    def kv_copy(self, src: int, dst: int, n: int) -> None:
        self._lib.llama_memory_seq_cp(self._memory, src, dst, 0, n)

    def kv_free(self, seq: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free_seqs.append(seq)

    # -- greedy replies in batch-invariant mode: the solo context ---------------------------
    def _reply_entry(self, prompt: list[int], sampling: SamplingParams) -> tuple[KVEntry, int]:
        if self._solo_ctx is not None and sampling.greedy:
            return KVEntry(_SOLO, in_use=True), 0
        return super()._reply_entry(prompt, sampling)

    def step(self, states: Sequence[GenState]) -> list[int | None]:
        if self._solo_ctx is None:
            return super().step(states)
        if self._solo_owner is None:  # the oldest waiting greedy reply takes the solo context
            self._solo_owner = next((s.entry for s in states if s.entry.handle is _SOLO), None)
            if self._solo_owner is not None:
                self._lib.llama_memory_clear(self._lib.llama_get_memory(self._solo_ctx.ctx), True)
        runnable = [s for s in states if s.entry.handle is not _SOLO or s.entry is self._solo_owner]
        tokens = dict(zip(map(id, runnable), super().step(runnable)))
        return [tokens.get(id(s)) for s in states]

    def finish(self, state: GenState, *, then: Sequence[int] = ()) -> None:
        if state.entry.handle is not _SOLO:
            super().finish(state, then=then)
        elif state.entry is self._solo_owner:
            self._solo_owner = None

    # -- compute ------------------------------------------------------------------------
    def _forward(self, entries: Sequence[KVEntry], new_tokens: Sequence[Sequence[int]], *,
                 all_logits: bool, layers: Sequence[int] = (), logits: bool = True,
                 last_states: bool = False) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        lib, batch = self._lib, self._batch
        rows: list[list[np.ndarray]] = [[] for _ in entries]
        wanted: list[tuple[int, int]] = []  # (batch position, entry index) whose logits are asked for
        # hidden states: the final layer exists only for positions marked as outputs
        final = self.n_layer in layers
        states: list[dict[int, list[np.ndarray]]] = [{x: [] for x in layers} for _ in entries]
        owners: list[int] = []  # entry index of every token of the current batch
        outputs: list[int] = []  # entry index of every output position of the current batch
        n = 0
        ctx = self._ctx.ctx  # the context of the current batch: a solo entry is computed in its own

        def flush() -> None:
            nonlocal n
            if not n:
                return
            batch.n_tokens = n
            self._states.start(layers)
            try:
                rc = lib.llama_decode(ctx, batch)
                # 1: no free cells for the batch. llama.cpp finds room for every micro-batch before
                # it writes anything, so the batch can be retried once idle sequences are evicted.
                while rc == 1 and ctx is self._ctx.ctx and self.kv.evict_one(keep=entries):
                    self._states.start(layers)
                    rc = lib.llama_decode(ctx, batch)
                captured = self._states.stop()
            except BaseException:
                self._states.stop()
                raise
            if rc == 1:
                raise KVCacheFullError("no room in the llama.cpp KV cache for this batch; retry shortly")
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            for pos, i in wanted:
                ptr = lib.llama_get_logits_ith(ctx, pos)
                rows[i].append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
            for layer, mat in captured.items():
                who = outputs if layer == self.n_layer else owners
                for i in set(who):
                    states[i][layer].append(mat[[k for k, w in enumerate(who) if w == i]])
            wanted.clear()
            owners.clear()
            outputs.clear()
            n = 0

        # All new tokens of all sequences in as few llama_decode calls as n_batch allows. One
        # decode of one token from each of B sequences, 2 threads, 0.5B Q4_K_M: B=1 40 ms, 2: 44,
        # 4: 62, 8: 100, 16: 181 (llama-batched-bench with unified KV: 40, 43, 61, 101, 182),
        # while B decodes of one token each cost B x 40 ms (docs/benchmarks.md).
        for i, (entry, new) in enumerate(zip(entries, new_tokens)):
            if n and self.batch_invariant:
                flush()
            solo = entry.handle is _SOLO
            ctx = self._solo_ctx.ctx if solo else self._ctx.ctx
            start = len(entry.tokens)
            last = len(new) - 1
            for k, tok in enumerate(new):
                if n == self._n_batch:
                    flush()
                batch.token[n] = tok
                batch.pos[n] = start + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = 0 if solo else entry.handle
                need = logits and (all_logits or k == last)
                state = final and (k == last or not last_states)
                batch.logits[n] = need or state
                if need:
                    wanted.append((n, i))
                if need or state:
                    outputs.append(i)
                owners.append(i)
                n += 1
        flush()
        out_logits = [np.stack(r) if all_logits else r[-1] for r in rows] if logits else None
        out_states = None
        if layers:
            out_states = [np.stack([np.concatenate(st[x])[-1:] if last_states else np.concatenate(st[x])
                                    for x in layers]) for st in states]
        return out_logits, out_states

    def _llguidance_tokenizer(self):
        import llguidance.llamacpp

        # llguidance's helper calls a llama-cpp-python function that warns it is deprecated,
        # once per token: keep those 150k warnings out of the caller's log.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return llguidance.llamacpp.lltokenizer_from_vocab(
                self._model.vocab, n_vocab=self.n_vocab, eos_token=sorted(self.eos_token_ids))

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self._solo_ctx is not None:
            self._solo_ctx.close()
        self._ctx.close()
        self._model.close()


class _StateCapture:
    """Copies hidden states out of llama.cpp's compute graph while a batch is computed.

    llama.cpp calls a scheduler callback (``cb_eval``) for every node of the graph, first to ask
    whether the caller wants the node's data, then, if so, once it is computed. The nodes read
    here are each layer's output (``l_out-{i}``, every token of the batch) and the final
    normalized output (``result_norm``, the output positions only). Between captures the
    callback answers "no" at once.
    """

    def __init__(self, n_layer: int, hidden_size: int) -> None:
        import llama_cpp

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._ggml = lib
        self.n_layer = n_layer
        self.hidden_size = hidden_size
        self._names: dict[bytes, int] = {}
        self._out: dict[int, list[np.ndarray]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _name(self, layer: int) -> bytes:
        return b"result_norm" if layer == self.n_layer else f"l_out-{layer - 1}".encode()

    def start(self, layers: Sequence[int]) -> None:
        self._names = {self._name(x): x for x in layers}
        self._out = {x: [] for x in layers}

    def stop(self) -> dict[int, np.ndarray]:
        names, self._names = self._names, {}
        out = {x: np.concatenate(parts) if parts else np.zeros((0, self.hidden_size), np.float32)
               for x, parts in self._out.items()}
        self._out = {}
        return out if names else {}

    def _on_node(self, tensor: int, ask: bool, user_data: int) -> bool:
        if not self._names:
            return not ask  # nothing wanted; (never asked to read)
        name = self._ggml.ggml_get_name(tensor)
        layer = self._names.get(name)
        if ask:
            return layer is not None
        if layer is not None and ctypes.c_int32.from_address(tensor).value == 0:  # GGML_TYPE_F32
            size = self._ggml.ggml_nbytes(tensor)
            buf = np.empty(size // 4, dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, size)
            self._out[layer].append(buf.reshape(-1, self.hidden_size))
        return True


def _kv_bytes_per_token(meta: dict[str, str]) -> int:
    """Bytes of F16 keys + values per token over all layers, from the GGUF metadata."""
    arch = meta.get("general.architecture", "llama")

    def get(key: str, default: int) -> int:
        try:
            return int(meta.get(f"{arch}.{key}", default))
        except ValueError:
            return default

    layers = get("block_count", 32)
    heads = get("attention.head_count", 32)
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = get("embedding_length", 4096) // max(heads, 1)
    k_dim = get("attention.key_length", head_dim)
    v_dim = get("attention.value_length", head_dim)
    return max(1, layers * kv_heads * (k_dim + v_dim) * 2)


"""The narrow backend interface every inference engine implements.

A backend owns one loaded model and implements a small core: tokenization and one compute
primitive, ``_forward`` (compute new tokens after the KV states of several sequences at once).
Everything else is shared and built here on top of it, so both engines behave the same:
``score_batch`` (log-probs of short continuations after a prefix: how classification works),
``start``/``step``/``finish`` (replies advanced one token per step, several at once: continuous
batching), KV reuse through :class:`~allinone.backends.kv_cache.KVPool`, sampling
(:mod:`.sampling`), stop rules and UTF-8-safe streaming (:class:`TextStreamer`).

A backend is not thread-safe: the engine owns it and calls it from one thread at a time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError, KVCacheFullError
from ..types import Message, SamplingParams, TextDelta
from . import constrained
from .chat_template import ChatTemplate
from .kv_cache import KVEntry, KVPool, common_prefix_len
from .sampling import log_softmax, sample


@dataclass(eq=False)
class GenState:
    """One reply being generated: its KV entry, what to compute next, and how to sample.

    Made by :meth:`Backend.start`, advanced one token at a time by :meth:`Backend.step`
    (several states at once: continuous batching) and ended by :meth:`Backend.finish`.
    """

    entry: KVEntry
    pending: list[int]
    history: list[int]
    sampling: SamplingParams
    rng: np.random.Generator
    matcher: object | None = None
    #: the context window is full: no further token can be computed
    exhausted: bool = False
    #: the sequence stays cached after the reply (see :meth:`Backend.start`)
    keep: bool = True
    #: tokens sampled so far (the reply's own, not the prompt's)
    n_sampled: int = 0
    #: where the reply begins in ``history`` (its written words, the prompt's last tokens, included)
    reply_start: int = 0


ScoreRequest = tuple[Sequence[int], Sequence[Sequence[int]]]


class Backend(abc.ABC):
    """One loaded model. Subclasses implement the abstract methods below and create ``self.kv``
    (the :class:`~allinone.backends.kv_cache.KVPool` of their KV states) when they load."""

    #: backend name: "llamacpp" or "transformers"
    name: str
    #: a display id of the loaded model
    model_id: str
    #: the context window in tokens (prompt + completion) of one sequence
    n_ctx: int
    #: ids that end generation (Qwen: <|im_end|>, <|endoftext|>)
    eos_token_ids: frozenset[int]
    chat_template: ChatTemplate
    kv: KVPool
    #: vocabulary size (columns of the logits)
    n_vocab: int
    #: most prompt tokens of one reply computed per step (see :meth:`step`)
    prefill_chunk: int = 256
    #: a text's label scores and hidden states do not depend on what else runs or ran before:
    #: each sequence is computed in its own forward pass, in slices that depend on the prompt
    #: alone (only declared task prefixes are reused, ``KVPool.declared_only``); greedy replies
    #: too (llama.cpp: in a context of their own, one at a time). Slower; docs/reliability.md
    #: says what it costs and why the default rounds differently.
    batch_invariant: bool = False

    # -- tokens -------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``, without BOS. With ``special=False`` (the default, for any
        user text) control-token strings such as ``<|im_start|>`` stay plain text."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are rendered as their text. Incomplete UTF-8 at the
        end comes out as U+FFFD (see :func:`stream_text` for streaming)."""

    @abc.abstractmethod
    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """The UTF-8 bytes each token stands for (a token may hold part of a multi-byte
        character); joined, they are the bytes of ``detokenize(ids)`` before decoding."""

    @property
    def bos_ids(self) -> list[int]:
        """Ids every prompt starts with (a BOS token, for models that want one); Qwen: none."""
        return []

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                    tokenize_text: Callable[[str], list[int]] | None = None,
                    content_starts: list[int] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own chat template.

        Message contents are tokenized as plain text (by ``tokenize_text`` if given), so a user
        cannot inject control tokens. ``content_starts``: see :meth:`ChatTemplate.render_ids`.
        """
        bos = self.bos_ids
        ids = self.chat_template.render_ids(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize_text=tokenize_text or (lambda s: self.tokenize(s, special=False)),
            tokenize_template=lambda s: self.tokenize(s, special=True),
            content_starts=content_starts,
        )
        if bos and content_starts is not None:
            content_starts[:] = [p + len(bos) for p in content_starts]
        return bos + ids

    def turn_closing_ids(self) -> list[int]:
        """The chat template's token ids between an assistant message's content and the next
        user message's content (ChatML: ``<|im_end|>\\n<|im_start|>user\\n``); ``[]`` when the
        template transforms contents and they cannot be located. Computed once."""
        if "_turn_closing" not in self.__dict__:
            starts: list[int] = []
            msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
            ids = self.render_chat(msgs, content_starts=starts)
            reply = self.tokenize("b")
            ok = len(starts) == 3 and ids[starts[1]:starts[1] + len(reply)] == reply
            self._turn_closing = ids[starts[1] + len(reply):starts[2]] if ok else []
        return list(self._turn_closing)

    def layer_index(self, layer: int) -> int:
        """``layer`` as 1 .. :attr:`n_layer` (negative: counted from the end, -1 = the final,
        normalized output).

        Raises:
            InvalidInputError: out of range.
        """
        resolved = layer + self.n_layer + 1 if layer < 0 else layer
        if not 1 <= resolved <= self.n_layer:
            raise InvalidInputError(f"layer {layer} is out of range: this model has {self.n_layer} layers",
                                    param="layers")
        return resolved

    # -- the one compute primitive --------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, entries: Sequence[KVEntry], new_tokens: Sequence[Sequence[int]], *,
                 all_logits: bool, layers: Sequence[int] = (), logits: bool = True,
                 last_states: bool = False) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """Compute ``new_tokens[i]`` after the KV state of ``entries[i]``, for every i at once
        (llama.cpp: one batch; transformers: one sequence after another), appending their keys
        and values to each state. ``entries[i].tokens`` is updated by the caller.

        Args:
            all_logits: logits for every new token, not only the last.
            layers: also return hidden states at these layers (1 .. n_layer, see
                :meth:`layer_index`) for every new token.
            logits: compute logits at all (encoding needs none).
            last_states: hidden states of each entry's last new token only. The final layer's
                state exists only at output positions, and llama.cpp sends every output
                position through the output head (n_vocab x hidden size multiply-adds: 136 M
                on the 0.5B model, about a quarter of its per-token cost) and keeps an
                n_vocab-float logits row for it: a classification head that reads one state
                must not make every prompt token an output.

        Returns:
            (logits, hidden): per entry, float32 logits of shape (n_vocab,) after its last new
            token, or (len(new_tokens[i]), n_vocab) with ``all_logits`` (``None`` without
            ``logits``); per entry, hidden states (len(layers), len(new_tokens[i]), hidden
            size) float32, or (len(layers), 1, hidden size) with ``last_states`` (``None``
            without ``layers``).
        """

    def forward(self, entries: Sequence[KVEntry], new_tokens: Sequence[Sequence[int]], *,
                all_logits: bool = False) -> list[np.ndarray]:
        """:meth:`_forward` with the bookkeeping: room in the KV budget, the context window,
        and each entry's token list. Returns the logits (see :meth:`_forward`).

        Raises:
            InvalidInputError: a sequence would exceed the context window.
            KVCacheFullError: the KV budget is spent by sequences in use.
        """
        return self.forward_hidden(entries, new_tokens, (), all_logits=all_logits)[0]

    def forward_hidden(self, entries: Sequence[KVEntry], new_tokens: Sequence[Sequence[int]],
                       layers: Sequence[int], *, all_logits: bool = False, logits: bool = True,
                       last_states: bool = False) -> tuple[list[np.ndarray] | None, list[np.ndarray] | None]:
        """:meth:`forward` that also returns hidden states at ``layers`` (see :meth:`_forward`)."""
        new_tokens = [list(t) for t in new_tokens]
        for entry, new in zip(entries, new_tokens):
            if not new:
                raise ValueError("forward needs at least one new token per sequence")
            if len(entry.tokens) + len(new) >= self.n_ctx:
                raise InvalidInputError(
                    f"prompt of {len(entry.tokens) + len(new)} tokens does not fit the context of {self.n_ctx}")
        layers = [self.layer_index(x) for x in layers]
        self.kv.reserve(sum(map(len, new_tokens)), keep=entries)
        try:
            out = self._forward(entries, new_tokens, all_logits=all_logits, layers=layers, logits=logits,
                                last_states=last_states)
        except BaseException:
            for entry in entries:  # the KV state may be half-written: never reuse it
                entry.tokens = []
            raise
        for entry, new in zip(entries, new_tokens):
            entry.tokens.extend(new)
        return out

    # -- encoding (hidden states for learned heads) --------------------------------------------
    def encode_batch(self, requests: Sequence[tuple[Sequence[int], int]], layers: Sequence[int], *,
                     keep: bool = True) -> list[np.ndarray]:
        """Hidden states of several prompts in one batched pass.

        Args:
            requests: (prompt ids, start): the states of positions ``start ..`` are wanted; the
                tokens before ``start`` may come from the KV cache (their states are not read).
            layers: 1 .. n_layer or negative from the end (see :meth:`layer_index`).
            keep: as in :meth:`score_batch_hidden`.

        Returns:
            per request, float32 (len(layers), len(prompt) - start, hidden size).

        Raises:
            InvalidInputError: an empty prompt, ``start`` out of range, a prompt over the context.
        """
        for ids, start in requests:
            if not ids or not 0 <= start < len(ids):
                raise InvalidInputError("encode needs a non-empty prompt and a start inside it")
            if len(ids) >= self.n_ctx:
                raise InvalidInputError(f"prompt of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        held: list[KVEntry] = []
        cached: list[int] = []
        kept: list[bool] = []
        stems = [] if self.batch_invariant else self._cache_shared_stems(requests)
        try:
            for ids, start in requests:
                entry, n = self.kv.acquire(ids, limit=start)
                held.append(entry)
                cached.append(n)
                kept.append(keep and n < self.kv.min_shared)
            # last-token pooling: only the last position needs to be an output (see _forward)
            last = all(start == len(ids) - 1 for ids, start in requests)
            _, hidden = self.forward_hidden(held, [list(ids)[n:] for (ids, _), n in zip(requests, cached)],
                                            layers, logits=False, last_states=last)
            return [h if last else h[:, start - n:] for h, (_, start), n in zip(hidden, requests, cached)]
        finally:
            for entry, k in zip(held, kept):
                self.kv.release(entry, keep=k and bool(entry.tokens))
            for entry in stems:  # a text's own tokens: not asked for again, and cells cost attention time
                self.kv.release(entry, keep=False)

    def _cache_shared_stems(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[KVEntry]:
        """Compute once what two or more prompts of a batch share before the states they read,
        beyond what is cached (e.g. the first copy of a text that two prompts then read in two
        ways: the Chinese tagger's ``echo+natural``), as shared KV entries that the prompts
        copy from; without it each prompt computes the shared part itself. The caller frees
        the entries after the batch.

        Only stems at least ``kv.min_shared`` tokens longer than the longest cached prefix are
        worth the extra pass. Sorted prompts: each prompt's longest common prefix with any
        other is the one with a neighbour.
        """
        order = sorted(range(len(requests)), key=lambda i: list(requests[i][0]))
        stems = {tuple(requests[a][0][: common_prefix_len(requests[a][0], requests[b][0],
                                                          min(requests[a][1], requests[b][1]))])
                 for a, b in zip(order, order[1:])}
        made = []
        for stem in sorted(stems, key=len):
            cached = max((common_prefix_len(e.tokens, stem) for e in self.kv.entries), default=0)
            if len(stem) - cached >= self.kv.min_shared:
                made.append(self._compute_shared(stem))
        return made

    # -- scoring (classification) --------------------------------------------------------------
    def score(self, prefix_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Log-probability (natural log, summed over tokens) of each continuation after the prefix.

        Args:
            prefix_ids: the shared prompt, length P >= 1.
            continuations: C non-empty token-id lists (labels); multi-token ones are scored
                token by token, each token conditioned on the prefix and its own earlier tokens.

        Returns:
            C floats, ``log p(continuation | prefix)``.
        """
        return self.score_batch([(prefix_ids, continuations)])[0]

    def score_batch(self, requests: Sequence[ScoreRequest], *, relative: bool = False,
                    keep: bool = True) -> list[list[float]]:
        """Scores only: see :meth:`score_batch_hidden`."""
        return self.score_batch_hidden(requests, (), relative=relative, keep=keep)[0]

    def score_batch_hidden(self, requests: Sequence[ScoreRequest], layers: Sequence[int], *,
                           relative: bool = False, keep: bool = True) -> tuple[list[list[float]], list[np.ndarray] | None]:
        """:meth:`score` for several (prefix, continuations) requests in one batched pass.

        Each prefix starts from its longest cached prefix (see :mod:`.kv_cache`); all prefixes
        are computed in one forward pass, then the inner tokens of all multi-token
        continuations in a second one (each in a copy of its prefix's KV state). Only the
        positions whose logits are needed are sent through the output head.

        Args:
            requests: (prefix ids, continuations) pairs.
            relative: the caller only compares continuations of one request with each other,
                so each request's scores may be shifted by one constant (lets a backend skip
                the output-head rows of tokens no continuation starts with).

            layers: also return each prefix's hidden states at its last token at these layers
                (see :meth:`layer_index`), from the same pass.
            keep: a prompt computed without a cached prefix stays cached whole, so that the
                next prompt sharing its start finds it; ``False``: no prompt stays cached (the
                caller caches what prompts share with :meth:`cache_prefix`). In llama.cpp's
                unified KV cache every computed token attends over all cells up to the last
                one in use, so a cached prompt no later one shares slows every later step.

        Returns:
            (scores, states): per request, one log-probability per continuation, as
            :meth:`score`; per request, float32 (len(layers), hidden size), or ``None`` without
            ``layers``.

        Raises:
            InvalidInputError: an empty prefix or continuation, or a prefix over the context.
        """
        self._check_score_requests(requests)
        if len(requests) > 1:
            self._cache_common_prefix([p for p, _ in requests])
        held: list[KVEntry] = []
        # A prompt that started from a cached prefix leaves only that prefix cached: its own
        # tokens are rarely asked for again, and every cached cell costs attention time.
        kept: list[bool] = []
        try:
            for prefix, _ in requests:
                entry, n = self.kv.acquire(prefix)
                held.append(entry)
                kept.append(keep and n < self.kv.min_shared)
            firsts, hidden = self.forward_hidden(held, [list(p)[len(e.tokens):] for e, (p, _) in zip(held, requests)],
                                                 layers, last_states=True)
            states = [h[:, -1].copy() for h in hidden] if hidden is not None else None
            scores = []
            for row, (_, conts) in zip(firsts, requests):
                logp = log_softmax(row)
                scores.append([float(logp[c[0]]) for c in conts])
            inner = [(i, j, list(c)) for i, (_, conts) in enumerate(requests) for j, c in enumerate(conts) if len(c) > 1]
            while inner:
                # each fork is a copy of its prompt: as many as free sequences and budget allow
                if self.batch_invariant:
                    # evict nothing, not even another task's idle prefix: its freed cells would
                    # sit before this prompt's and flash attention sums in cell order
                    room = self.kv.max_entries - len(self.kv.entries)
                else:
                    room = self.kv.max_entries - sum(e.in_use for e in self.kv.entries)
                budget = self.kv.capacity_tokens - sum(len(e.tokens) for e in self.kv.entries if e.in_use)
                size, cost = 0, 0
                while size < len(inner):
                    i, _, c = inner[size]
                    cost += len(held[i].tokens) + len(c)
                    if size and (size >= room or cost > budget):
                        break
                    size += 1
                group, inner = inner[:size], inner[size:]
                forks: list[KVEntry] = []
                try:
                    if self.batch_invariant:
                        # A fork's few new cells may land before its prompt's in the cache,
                        # and flash attention sums in cell order: here each continuation
                        # recomputes its prompt after the declared prefix, in one pass.
                        news = []
                        for i, _, c in group:
                            fork, n = self.kv.acquire(requests[i][0])
                            forks.append(fork)
                            news.append(list(requests[i][0])[n:] + c[:-1])
                        rows = [r[len(new) - len(c) + 1:] for r, new, (_, _, c) in
                                zip(self.forward(forks, news, all_logits=True), news, group)]
                    else:
                        for i, _, _ in group:
                            forks.append(self.kv.fork(held[i]))
                        rows = self.forward(forks, [c[:-1] for _, _, c in group], all_logits=True)
                    for (i, j, c), logits in zip(group, rows):
                        scores[i][j] += sum(float(log_softmax(logits[k])[c[k + 1]]) for k in range(len(c) - 1))
                finally:
                    for f in forks:
                        self.kv.release(f, keep=False)
            return scores, states
        finally:
            for entry, k in zip(held, kept):
                self.kv.release(entry, keep=k and bool(entry.tokens))

    def _check_score_requests(self, requests: Sequence[ScoreRequest]) -> None:
        """Reject an empty prefix or continuation, or one that would not fit the context, before
        any KV entry is taken."""
        for prefix, conts in requests:
            if not prefix:
                raise InvalidInputError("score needs a non-empty prefix")
            if any(not c for c in conts):
                raise InvalidInputError("score needs non-empty continuations")
            longest = len(prefix) + max([len(c) - 1 for c in conts], default=0)
            if longest >= self.n_ctx:
                raise InvalidInputError(f"prompt of {longest} tokens does not fit the context of {self.n_ctx}")

    def _cache_common_prefix(self, prompts: Sequence[Sequence[int]]) -> None:
        """Compute the prefix all ``prompts`` share once, as a shared KV entry, so that a batch
        arriving before any of its prompts is cached does not compute it once per prompt."""
        if self.batch_invariant:  # what a batch's prompts share depends on the batch
            return
        common = list(prompts[0][: min(map(len, prompts)) - 1])
        for p in prompts[1:]:
            common = common[: common_prefix_len(common, p)]
        self.cache_prefix(common)

    def cache_prefix(self, ids: Sequence[int]) -> None:
        """Keep ``ids`` (a task's fixed prompt before its text) cached as a shared KV entry that
        later prompts copy from, computing what is not cached yet; nothing for fewer than the
        pool's ``min_shared`` tokens or when an entry holds them already."""
        common = list(ids)
        if len(common) < self.kv.min_shared:
            return
        if any(e.shared and e.tokens == common for e in self.kv.entries):
            return
        self._compute_shared(common)

    def _compute_shared(self, ids: list[int]) -> KVEntry:
        """A new idle shared entry holding ``ids``, from the longest cached prefix on."""
        # batch-invariant: from scratch, so the prefix's states do not depend on what is cached
        entry, n = self.kv.acquire(ids, limit=0 if self.batch_invariant else None)
        try:
            if n < len(ids):
                self.forward_hidden([entry], [ids[n:]], (), logits=False)
        except BaseException:
            self.kv.release(entry, keep=False)
            raise
        entry.shared = True
        self.kv.release(entry)
        return entry

    # -- generation -------------------------------------------------------------------------
    def start(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
              json_schema: dict | None = None, keep: bool = True, written: int = 0) -> GenState:
        """Begin a reply to ``prompt_ids``: take the KV entry with its longest cached prefix.
        With ``keep`` the sequence stays cached after :meth:`finish`, for a conversation's next
        turn; a task's reply to one text is not continued, so it is freed. ``written``: how
        many of the prompt's last tokens are the reply's first words, already written (the
        DRY penalty counts them as the reply's).

        With ``json_schema`` (the subset of :mod:`allinone.tasks.schema`), only tokens that keep
        the output a prefix of a JSON document valid under the schema can be sampled, and an
        end token only once it is complete (llguidance, see :mod:`.constrained`).

        Raises:
            InvalidInputError: empty prompt, a prompt that fills the context, a bad schema.
            KVCacheFullError: no KV entry is free.
        """
        prompt = list(prompt_ids)
        if not prompt:
            raise InvalidInputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise InvalidInputError(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        matcher = self.json_matcher(json_schema) if json_schema is not None else None
        entry, n = self._reply_entry(prompt, sampling)
        return GenState(entry=entry, pending=prompt[n:], history=prompt, sampling=sampling,
                        rng=np.random.default_rng(sampling.seed), matcher=matcher, keep=keep,
                        reply_start=len(prompt) - min(max(written, 0), len(prompt)))

    def _reply_entry(self, prompt: list[int], sampling: SamplingParams) -> tuple[KVEntry, int]:
        """The KV entry a reply to ``prompt`` is computed in, and how many of its first tokens
        that entry holds already (the longest cached prefix)."""
        return self.kv.acquire(prompt)

    def step(self, states: Sequence[GenState]) -> list[int | None]:
        """Advance each state by one step (continuous batching).

        The first state whose prompt is not computed yet gets its next slice of at most
        :attr:`prefill_chunk` tokens (one slice per step: chunked prefill, as llama.cpp's server
        and vLLM do), so a long prompt is computed between other work: a short request waits
        for a slice, not for the whole prompt, and a cancelled one stops after the slice it is
        in. A prompt's slices
        start at fixed offsets and each is computed alone, so the same prompt is computed the
        same way whatever else runs. A state whose prompt is done samples one token: the
        prompt's last token is computed on its own, as every reply token is (llama.cpp rounds
        differently for one token than inside a batch, and otherwise the first reply token
        would depend on how much of the prompt happened to be cached). The replies ready for a
        token are decoded together in one forward pass, greedy ones too: computing greedy
        replies one sequence per pass bought no determinism on llama.cpp (a reply still depends
        on where its KV cells sit) and cost 8 streams 60 % of their throughput
        (docs/benchmarks.md). With :attr:`batch_invariant` the llama.cpp backend computes one
        sequence per pass and greedy replies in a context of their own
        (:class:`~allinone.backends.llamacpp.LlamaCppBackend`).

        Returns:
            per state, in order: the sampled token id (end tokens included: stopping is the
            caller's business, see :class:`TextStreamer`), or ``None`` while its prompt is being
            computed.
        """
        fresh = next((s for s in states if len(s.pending) > 1), None)  # one slice per step, oldest first
        if fresh is not None:
            take = min(self.prefill_chunk, len(fresh.pending) - 1)
            self.forward_hidden([fresh.entry], [fresh.pending[:take]], (), logits=False)
            fresh.pending = fresh.pending[take:]
        ready = [s for s in states if len(s.pending) == 1]
        rows: dict[int, np.ndarray] = {}
        if ready:
            for s, logits in zip(ready, self.forward([s.entry for s in ready], [s.pending for s in ready])):
                rows[id(s)] = logits
        out: list[int | None] = []
        for state in states:
            logits = rows.get(id(state))
            if logits is None:
                out.append(None)
                continue
            allowed = constrained.allowed_tokens(state.matcher, logits.shape[-1]) if state.matcher else None
            if state.n_sampled < state.sampling.min_tokens:
                # no end token yet, unless a grammar allows nothing else (a complete JSON document)
                mask = np.ones(logits.shape[-1], dtype=bool) if allowed is None else allowed.copy()
                mask[[t for t in self.eos_token_ids if t < mask.size]] = False
                if mask.any():
                    allowed = mask
            state.n_sampled += 1
            tok = sample(logits, state.sampling, state.history, state.rng, allowed,
                         reply_start=state.reply_start, token_text=self.token_text)
            if state.matcher is not None and tok not in self.eos_token_ids and not state.matcher.consume_token(tok):
                raise RuntimeError(f"constrained decoding failed: {state.matcher.get_error()}")  # pragma: no cover
            state.history.append(tok)
            state.pending = [tok]
            # the sampled token is computed on the next step: it needs a free position
            state.exhausted = len(state.history) + 1 >= self.n_ctx
            out.append(tok)
        return out

    def token_text(self, token_id: int) -> str:
        """The text of one token (the characters its bytes hold whole; ``""`` for a control
        token), remembered per token: the sampler's DRY penalty reads it every step."""
        memo = self.__dict__.setdefault("_token_texts", {})
        text = memo.get(token_id)
        if text is None:
            text = memo[token_id] = self.token_bytes([token_id])[0].decode("utf-8", errors="ignore")
        return text

    def finish(self, state: GenState, *, then: Sequence[int] = ()) -> None:
        """End a reply; its KV state stays cached for the conversation's next turn (unless it
        was started without ``keep``). ``then``: tokens computed into the kept sequence first
        (the turn's closing, :meth:`turn_closing_ids`, so the next turn's prompt finds them
        cached instead of computing them before its first token); skipped when they do not
        fit the context or the KV budget."""
        try:
            if then and state.keep and len(state.entry.tokens) + len(then) < self.n_ctx:
                self.forward_hidden([state.entry], [list(then)], (), logits=False)
        except KVCacheFullError:
            pass  # only a head start for the next turn: the reply itself is done
        finally:
            self.kv.release(state.entry, keep=state.keep and bool(state.entry.tokens))

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                 json_schema: dict | None = None) -> Iterator[int]:
        """Sample token ids one at a time after ``prompt_ids`` (one sequence on its own).

        The stream is open-ended: it yields end tokens too and only returns on its own when the
        context window is full. :func:`stream_text` applies ``max_tokens``, end tokens and stop
        strings; closing the generator stops the work. ``json_schema``: see :meth:`start`.
        """
        state = self.start(prompt_ids, sampling, json_schema=json_schema)
        try:
            while not state.exhausted:
                tok = self.step([state])[0]
                if tok is not None:
                    yield tok
        finally:
            self.finish(state)

    def json_matcher(self, schema: dict):
        """An llguidance matcher for ``schema`` over this model's tokenizer.

        Raises:
            BackendUnavailableError: llguidance is not installed.
            InvalidInputError: the schema cannot be compiled.
        """
        if getattr(self, "_constrainer", None) is None:
            if not constrained.available():  # pragma: no cover - depends on the install
                raise BackendUnavailableError("JSON-constrained decoding needs llguidance: pip install llguidance")
            self._constrainer = constrained.JsonConstrainer(self._llguidance_tokenizer)
        return self._constrainer.matcher(schema)

    def _llguidance_tokenizer(self):  # pragma: no cover - each backend overrides
        raise BackendUnavailableError(f"the {self.name} backend has no llguidance tokenizer")

    def close(self) -> None:  # noqa: B027 - an optional hook  # pragma: no cover - trivial
        """Release the model's memory."""


class TextStreamer:
    """Turns sampled token ids into UTF-8-safe text deltas and decides when a reply ends.

    Text is only emitted once it decodes without a trailing replacement character, so a
    multi-byte character (CJK, emoji) split across tokens is never cut in half. Stop strings are
    held back until it is certain no stop string starts in the pending text. The reply ends at
    an end token ("stop"), a stop string ("stop"), ``max_tokens`` ("length") or a full context
    ("length", :meth:`close`).
    """

    def __init__(self, backend: Backend, sampling: SamplingParams) -> None:
        self.backend = backend
        self.sampling = sampling
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of the decoded text already yielded
        self.finish_reason: str | None = None
        self.holdback = max((len(s) for s in sampling.stop), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, tok: int) -> list[TextDelta]:
        """Take one sampled token; return the deltas it releases (the final one when the reply
        ends with it)."""
        if self.done:
            return []
        if tok in self.backend.eos_token_ids:
            return [self.close("stop")]
        self.ids.append(tok)
        self.text = self.backend.detokenize(self.ids)
        if self.sampling.stop:
            cut = _find_stop(self.text, self.sampling.stop, start=max(0, self.emitted - self.holdback))
            if cut is not None:
                self.text = self.text[:cut]
                return [self.close("stop")]
        if len(self.ids) >= self.sampling.max_tokens:
            return [self.close("length")]
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        safe -= self.holdback if self.sampling.stop else 0
        if safe > self.emitted:
            delta = TextDelta(self.text[self.emitted:safe], token_ids=list(self.ids))
            self.emitted = safe
            return [delta]
        return []

    def close(self, finish_reason: str = "length") -> TextDelta:
        """End the reply now; the final delta with the rest of the text and the finish reason."""
        self.finish_reason = finish_reason
        tail = self.text[self.emitted:]
        if finish_reason == "length":
            # max_tokens may cut a multi-byte character in half: drop the partial character.
            tail = tail.rstrip("\ufffd")
        self.emitted = len(self.text)
        return TextDelta(tail, finish_reason=finish_reason, completion_tokens=len(self.ids),
                         token_ids=list(self.ids))


def stream_text(backend: Backend, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                json_schema: dict | None = None) -> Iterator[TextDelta]:
    """Generate a reply on its own (no batching) and yield it as text deltas, ending with the
    finish reason; see :class:`TextStreamer`.

    Yields:
        TextDelta pieces; the last has ``finish_reason`` "stop" (end token or stop string) or
        "length" (``max_tokens`` reached or the context window full) and the token count.
    """
    streamer = TextStreamer(backend, sampling)
    gen = backend.generate(prompt_ids, sampling, json_schema=json_schema)
    try:
        for tok in gen:
            yield from streamer.push(tok)
            if streamer.done:
                return
    finally:
        gen.close()
    yield streamer.close("length")


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None

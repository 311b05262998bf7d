"""Which KV states a backend keeps: a pool of token sequences reused by longest common prefix.

Every sequence a backend computes (a classification prompt, a conversation turn, a reply being
generated) lives in one *entry*: a backend handle to its KV state (a llama.cpp sequence id, a
transformers ``DynamicCache``) and the token ids that state holds. A new prompt starts from the
entry sharing its longest common prefix, so only the tokens after it are computed:

* **conversation reuse**: an idle entry whose tokens are all a prefix of the new prompt (the
  last turn of the same conversation) is continued in place;
* **prefix cache**: when the shared part is only a prefix of the entry (two requests of one task
  differ after the task's instructions and few-shot examples), that prefix is copied into a
  *shared* entry of its own, which later prompts copy from and which is never continued in
  place, so interleaved work (a chat between two classifications) cannot wipe it out.

The same idea as automatic prefix caching in vLLM and RadixAttention in SGLang (Zheng et al.
2024, "SGLang: Efficient Execution of Structured Language Model Programs"), at the granularity of
whole sequences instead of blocks. Entries are evicted least recently used first when the token
budget (the configured megabytes of KV cache) or the number of entries is exhausted; entries in
use are never evicted. A backend whose sequences all attend over one shared pool of cells
(llama.cpp's unified KV cache) also caps what idle conversations may hold (``idle_tokens``):
there an idle entry is not free, every later forward pass attends over its cells too. Shared
prefixes (a task's fixed prompt, a system prompt several conversations start with) are not
capped: each serves many requests, and only the token budget evicts them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import KVCacheFullError


class KVStore(Protocol):
    """The three KV operations a backend provides to the pool."""

    def kv_new(self) -> Any:
        """A handle to a new, empty KV state."""

    def kv_copy(self, src: Any, dst: Any, n: int) -> None:
        """Make the empty ``dst`` hold the first ``n`` positions of ``src``."""

    def kv_free(self, handle: Any) -> None:
        """Release ``handle``; it is not used again."""


@dataclass(eq=False)
class KVEntry:
    """One cached sequence.

    Attributes:
        handle: the backend's KV state.
        tokens: the token ids whose keys and values the state holds, positions 0..len-1.
        shared: a prefix kept only as a copy source (never continued in place).
        in_use: held by a running request; not evictable.
        last_used: logical clock of the last use, for LRU eviction.
    """

    handle: Any
    tokens: list[int] = field(default_factory=list)
    shared: bool = False
    in_use: bool = False
    last_used: int = 0
    #: the entry this one was copied from and how many of its positions were copied
    source: "KVEntry | None" = field(default=None, repr=False)
    source_n: int = 0


def common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (at most ``limit``)."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVPool:
    """Cached KV entries of one backend, reused by longest common prefix, evicted LRU.

    Args:
        store: the backend's KV operations.
        capacity_tokens: the most token positions held over all entries (shared prefixes are
            counted once per entry, so the true memory use is at most this).
        max_entries: the most entries at once (llama.cpp: its sequence slots).
        min_shared: the shortest common prefix worth keeping as a shared entry, in tokens.

        copies_share: a copy shares its source's memory (llama.cpp tags the same cells with
            both sequences): see :attr:`used_tokens`. Without it (transformers clones the
            tensors) every entry's positions are counted, copied ones included.
        declared_only: reuse only whole prefixes declared shared (a task's fixed prompt, see
            ``Backend.cache_prefix``), never a part of one nor an earlier prompt: how much of a
            prompt is computed then depends on the prompt alone, not on what ran before it
            (the backends' ``batch_invariant`` mode).
        idle_tokens: the most token positions idle entries that are not shared prefixes (kept
            conversations) hold, beyond the most recently used one (always kept, so the
            conversation just answered can go on in place); ``None``: no cap. An entry counts
            its own positions: not those it shares with its live source, nor those of a live
            shared prefix copied from it (with ``copies_share`` those cells stay while either
            lives).

    Counting a copy's copied positions under its source only while the source lives keeps the
    count an upper bound: counting only a copy's own positions fell short once a source was
    evicted while its copies lived on, and llama.cpp ran out of cells; counting them always
    made 16 copies of a 900-token task prompt look like 14,400 tokens, so a batch evicted the
    task prompt it was copying and recomputed it.
    """

    def __init__(self, store: KVStore, *, capacity_tokens: int, max_entries: int, min_shared: int = 16,
                 copies_share: bool = False, declared_only: bool = False, idle_tokens: int | None = None) -> None:
        self.store = store
        self.idle_tokens = idle_tokens
        self.declared_only = declared_only
        self.copies_share = copies_share
        self.capacity_tokens = capacity_tokens
        self.max_entries = max_entries
        self.min_shared = min_shared
        self.entries: list[KVEntry] = []
        self._clock = itertools.count(1)
        #: counters for metrics and tests: tokens asked for, tokens found cached
        self.prompt_tokens = 0
        self.cached_tokens = 0

    @property
    def used_tokens(self) -> int:
        """Token positions held, summed over entries. With ``copies_share`` (llama.cpp tags one
        cell with every sequence holding it), a copy's copied positions count once, under its
        source, while the source lives; after the source is gone they count under the copy, so
        the figure stays an upper bound of the cells in use."""
        if not self.copies_share:
            return sum(len(e.tokens) for e in self.entries)
        alive = {id(e) for e in self.entries}
        return sum(len(e.tokens) - (min(e.source_n, len(e.tokens)) if e.source is not None and id(e.source) in alive else 0)
                   for e in self.entries)

    def acquire(self, prompt: Sequence[int], *, limit: int | None = None) -> tuple[KVEntry, int]:
        """An entry, marked in use, holding the longest cached prefix of ``prompt``.

        At least the last prompt token is left to compute, so the caller gets its logits; with
        ``limit``, at most that many tokens come from the cache (the caller needs the states of
        the positions after it).

        Returns:
            (entry, n): ``entry.tokens == prompt[:n]``; the caller computes ``prompt[n:]``.

        Raises:
            KVCacheFullError: every entry is in use and no room is left.
        """
        prompt = list(prompt)
        limit = len(prompt) - 1 if limit is None else min(limit, len(prompt) - 1)
        best, n = None, 0
        best_key = (0, False, False)
        for e in self.entries:
            m = common_prefix_len(e.tokens, prompt, limit)
            if self.declared_only and not (e.shared and m == len(e.tokens)):
                continue
            continues = not e.in_use and not e.shared and m == len(e.tokens)
            key = (m, continues, e.shared)
            if m > 0 and key > best_key:
                best, n, best_key = e, m, key
        self.prompt_tokens += len(prompt)
        self.cached_tokens += n
        if best is not None and best_key[1]:
            best.in_use = True
            best.last_used = next(self._clock)
            return best, n
        if best is not None:
            best.last_used = next(self._clock)
            if n >= self.min_shared and n < len(best.tokens) and not best.shared:
                best = self._copy_of(best, n, shared=True)
            elif n < self.min_shared and n < len(best.tokens):
                best, n = None, 0  # too short to be worth a copy
        if best is None:
            entry = self._new_entry()
            return entry, 0
        return self._copy_of(best, n, shared=False), n

    def fork(self, entry: KVEntry) -> KVEntry:
        """A new in-use entry holding a copy of ``entry``'s tokens (e.g. to score one label)."""
        return self._copy_of(entry, len(entry.tokens), shared=False)

    def reserve(self, n: int, *, keep: Sequence[KVEntry] = ()) -> None:
        """Make room for ``n`` more token positions, evicting idle entries LRU.

        Raises:
            KVCacheFullError: not enough room even with every idle entry evicted.
        """
        while self.used_tokens + n > self.capacity_tokens:
            if not self.evict_one(keep):
                raise KVCacheFullError(
                    f"the KV cache is full ({self.used_tokens} of {self.capacity_tokens} tokens in use); "
                    "retry shortly or raise kv_cache_mb"
                )

    def release(self, entry: KVEntry, *, keep: bool = True) -> None:
        """End the use of ``entry``; keep it for reuse, or free it."""
        entry.in_use = False
        entry.last_used = next(self._clock)
        if not keep or (self.declared_only and not entry.shared):  # never reused: free it now
            self._drop(entry)
        elif not entry.shared:  # a kept conversation: the only way idle entries grow
            self._trim_idle()

    def clear(self) -> None:
        """Free every entry (in use or not)."""
        for e in list(self.entries):
            self._drop(e)

    # -- internals ----------------------------------------------------------------------
    def _trim_idle(self) -> None:
        """Evict idle entries that are not shared prefixes, least recently used first, until they
        hold at most ``idle_tokens`` positions beyond the most recently used of them."""
        if self.idle_tokens is None:
            return
        older = sorted((e for e in self.entries if not e.in_use and not e.shared), key=lambda e: e.last_used)[:-1]
        # counted once: a kept conversation copies from a shared prefix or a running entry, so
        # dropping one leaves the others' own positions as they were
        owns = [self._own(e) for e in older]
        held = sum(owns)
        for entry, own in zip(older, owns):
            if held <= self.idle_tokens:
                break
            self._drop(entry)
            held -= own

    def _own(self, entry: KVEntry) -> int:
        """The positions of ``entry`` that no other live entry holds (see ``idle_tokens``)."""
        if not self.copies_share:
            return len(entry.tokens)
        shared = [c.source_n for c in self.entries if c.source is entry and c.shared]
        if entry.source is not None and entry.source in self.entries:
            shared.append(entry.source_n)
        return len(entry.tokens) - min(max(shared, default=0), len(entry.tokens))

    def _new_entry(self, *, keep: Sequence[KVEntry] = ()) -> KVEntry:
        while len(self.entries) >= self.max_entries:
            if not self.evict_one(keep):
                raise KVCacheFullError(f"all {self.max_entries} KV sequences are in use; retry shortly")
        entry = KVEntry(self.store.kv_new(), in_use=True, last_used=next(self._clock))
        self.entries.append(entry)
        return entry

    def _copy_of(self, src: KVEntry, n: int, *, shared: bool) -> KVEntry:
        src.in_use, was_in_use = True, src.in_use  # protect the source from eviction meanwhile
        try:
            self.reserve(0 if self.copies_share else n, keep=(src,))  # shared cells cost nothing more
            entry = self._new_entry(keep=(src,))
            try:
                self.store.kv_copy(src.handle, entry.handle, n)
            except BaseException:
                self._drop(entry)
                raise
        finally:
            src.in_use = was_in_use
        entry.tokens = list(src.tokens[:n])
        entry.source, entry.source_n = src, n
        if shared:
            entry.shared, entry.in_use = True, False
        return entry

    def evict_one(self, keep: Sequence[KVEntry] = ()) -> bool:
        """Evict the least recently used idle entry not in ``keep``; False if there is none."""
        idle = [e for e in self.entries if not e.in_use and e not in keep]
        if not idle:
            return False
        self._drop(min(idle, key=lambda e: e.last_used))
        return True

    def _drop(self, entry: KVEntry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            self.store.kv_free(entry.handle)

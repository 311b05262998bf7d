"""The KV pool's policy on a recording fake store: prefix reuse, shared prefixes, LRU, budget."""

from __future__ import annotations

import pytest

from allinone.backends.kv_cache import KVCacheFullError, KVPool, common_prefix_len


class RecordingStore:
    """A KV store whose 'state' is the token list itself, so copies can be checked."""

    def __init__(self) -> None:
        self.states: dict[int, list[int]] = {}
        self.next = 0
        self.copies: list[tuple[int, int, int]] = []
        self.freed: list[int] = []

    def kv_new(self) -> int:
        self.next += 1
        self.states[self.next] = []
        return self.next

    def kv_copy(self, src: int, dst: int, n: int) -> None:
        assert self.states[dst] == []
        self.states[dst] = self.states[src][:n]
        self.copies.append((src, dst, n))

    def kv_free(self, handle: int) -> None:
        del self.states[handle]
        self.freed.append(handle)


def compute(pool: KVPool, store: RecordingStore, prompt: list[int], *, keep: bool = True):
    """What a backend does: acquire, 'compute' the rest, release."""
    entry, n = pool.acquire(prompt)
    assert entry.tokens == prompt[:n] and store.states[entry.handle] == prompt[:n]
    pool.reserve(len(prompt) - n, keep=[entry])
    entry.tokens = list(prompt)
    store.states[entry.handle] = list(prompt)
    pool.release(entry, keep=keep)
    return entry, n


def make(capacity=1000, entries=8, min_shared=4):
    store = RecordingStore()
    return KVPool(store, capacity_tokens=capacity, max_entries=entries, min_shared=min_shared), store


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([1, 2, 3], [1, 2, 3], limit=1) == 1
    assert common_prefix_len([], [1]) == 0


def test_a_conversation_is_continued_in_place():
    pool, store = make()
    turn1 = [1, 2, 3, 4, 5, 6]
    e1, n1 = compute(pool, store, turn1)
    turn2 = turn1 + [7, 8, 9]
    e2, n2 = compute(pool, store, turn2)
    assert n1 == 0 and n2 == len(turn1)
    assert e2 is e1 and store.copies == []  # no copy: the same entry grew
    assert len(pool.entries) == 1


def test_two_prompts_of_one_task_share_a_prefix_entry_that_outlives_other_work():
    pool, store = make()
    task = [9, 9, 9, 9, 9, 9]
    compute(pool, store, task + [1, 1])
    _, n = compute(pool, store, task + [2, 2])
    assert n == len(task)
    shared = [e for e in pool.entries if e.shared]
    assert [e.tokens for e in shared] == [task]
    compute(pool, store, [5, 5, 5, 5, 5, 5, 5])  # a chat in between
    _, n = compute(pool, store, task + [3, 3])
    assert n == len(task)  # still found
    assert [e.tokens for e in pool.entries if e.shared] == [task]  # and not duplicated


def test_a_shared_entry_is_never_continued_in_place():
    pool, store = make()
    task = [9] * 6
    compute(pool, store, task + [1])
    compute(pool, store, task + [2])
    shared = next(e for e in pool.entries if e.shared)
    entry, n = pool.acquire(task + [7, 7])
    assert entry is not shared and n == len(task) and shared.tokens == task
    pool.release(entry)


def test_short_overlaps_are_not_worth_a_copy():
    pool, store = make(min_shared=4)
    compute(pool, store, [1, 2, 3, 4, 5])
    _, n = compute(pool, store, [1, 2, 9, 9, 9])
    assert n == 0 and store.copies == []


def test_at_least_one_token_is_left_to_compute():
    pool, store = make()
    compute(pool, store, [1, 2, 3, 4, 5])
    entry, n = pool.acquire([1, 2, 3, 4, 5])
    assert n == 4
    pool.release(entry)


def test_lru_eviction_by_count_spares_recently_used_and_in_use_entries():
    pool, store = make(entries=3, min_shared=100)
    a, _ = compute(pool, store, [1, 1, 1])
    b, _ = compute(pool, store, [2, 2, 2])
    c, _ = compute(pool, store, [3, 3, 3])
    compute(pool, store, [1, 1, 1, 1])  # touches a (continued in place)
    held, _ = pool.acquire([4, 4, 4])  # full: evicts the least recently used, b
    assert b not in pool.entries and a in pool.entries and c in pool.entries
    with pytest.raises(KVCacheFullError):
        for i in range(3):  # a and c go, then nothing is left
            pool.acquire([5 + i, 5, 5])
    assert held in pool.entries


def test_token_budget_evicts_lru_and_raises_when_only_running_work_is_left():
    pool, store = make(capacity=10, min_shared=100)
    first, _ = compute(pool, store, [1] * 6)
    second, _ = compute(pool, store, [2] * 3)
    entry, _ = pool.acquire([3] * 5)
    pool.reserve(5, keep=[entry])  # 9 + 5 > 10: the oldest idle entry (first) goes
    assert first not in pool.entries and second in pool.entries
    with pytest.raises(KVCacheFullError):
        pool.reserve(20, keep=[entry])
    assert store.freed  # evicted entries were freed in the store
    pool.release(entry, keep=False)
    assert entry not in pool.entries


def test_fork_copies_and_counts():
    pool, store = make()
    entry, _ = compute(pool, store, [1, 2, 3, 4])
    entry, _ = pool.acquire([1, 2, 3, 4, 5])
    fork = pool.fork(entry)
    assert fork.tokens == entry.tokens and store.states[fork.handle] == entry.tokens and fork.in_use
    pool.release(fork, keep=False)
    pool.release(entry)
    assert pool.prompt_tokens == 9 and pool.cached_tokens == 4


def test_copies_that_share_their_source_count_once_while_it_lives():
    store = RecordingStore()
    pool = KVPool(store, capacity_tokens=1500, max_entries=32, min_shared=4, copies_share=True)
    prefix = list(range(900))
    compute(pool, store, prefix + [1])
    held = []
    for k in range(16):  # 16 prompts of one task held at once: copies of the 900-token prefix + 10 tokens
        prompt = prefix + [1000 + k] * 10
        entry, n = pool.acquire(prompt)
        assert n == 900
        pool.reserve(10, keep=[entry])
        entry.tokens = list(prompt)
        store.states[entry.handle] = list(prompt)
        held.append(entry)
    assert pool.used_tokens <= 901 + 16 * 10  # the prefix counted once, under the entry holding it
    assert any(len(e.tokens) >= 900 and not e.in_use for e in pool.entries)  # the task prefix is still cached
    for entry in held:
        pool.release(entry, keep=False)
    pool.evict_one()  # the prefix's holder goes: its copy (the shared entry) now counts its cells
    assert pool.used_tokens == sum(len(e.tokens) for e in pool.entries) >= 900


def test_declared_only_reuses_a_declared_prefix_whole_and_nothing_else():
    """batch-invariant mode: how much of a prompt is computed depends on the prompt alone."""
    store = RecordingStore()
    pool = KVPool(store, capacity_tokens=1000, max_entries=8, min_shared=4, declared_only=True)
    task_prefix = [1, 2, 3, 4, 5]
    entry, n = pool.acquire(task_prefix, limit=0)  # what Backend.cache_prefix does in this mode
    assert n == 0
    entry.tokens = list(task_prefix)
    store.states[entry.handle] = list(task_prefix)
    entry.shared = True
    pool.release(entry)

    _, n = compute(pool, store, task_prefix + [6, 7, 8])
    assert n == len(task_prefix)  # the declared prefix, whole
    _, n = compute(pool, store, task_prefix + [6, 7, 8])
    assert n == len(task_prefix)  # not the earlier prompt, although it ran before
    _, n = compute(pool, store, [1, 2, 3, 9, 9, 9])
    assert n == 0  # a part of a declared prefix is not reused either
    assert [e.tokens for e in pool.entries] == [task_prefix]  # prompts are freed, not kept


def test_without_declared_only_an_earlier_prompt_is_reused():
    pool, store = make()
    compute(pool, store, [1, 2, 3, 4, 5, 6, 7, 8])
    _, n = compute(pool, store, [1, 2, 3, 4, 5, 6, 7, 9])
    assert n == 7


def test_idle_entries_beyond_the_cap_are_evicted_oldest_first():
    store = RecordingStore()
    pool = KVPool(store, capacity_tokens=10_000, max_entries=16, min_shared=4, idle_tokens=25)
    a, _ = compute(pool, store, [1] * 10)
    b, _ = compute(pool, store, [2] * 10)
    c, _ = compute(pool, store, [3] * 10)
    assert pool.entries == [a, b, c]  # 20 idle positions besides the latest: under the cap
    d, _ = compute(pool, store, [4] * 10)
    assert pool.entries == [b, c, d] and a.handle in store.freed  # 30 > 25: the oldest goes


def test_the_latest_idle_entry_stays_however_long_and_entries_in_use_are_not_counted():
    store = RecordingStore()
    pool = KVPool(store, capacity_tokens=10_000, max_entries=16, min_shared=4, idle_tokens=25)
    running, _ = pool.acquire([9] * 100)
    pool.reserve(100, keep=[running])
    running.tokens = [9] * 100
    small, _ = compute(pool, store, [1] * 10)
    long_, _ = compute(pool, store, [2] * 40)  # over the cap alone: kept, as the latest
    assert small in pool.entries and long_ in pool.entries and running in pool.entries
    other, _ = compute(pool, store, [3] * 20)
    assert pool.entries == [running, other]  # 50 positions behind the latest: both older ones go
    pool.release(running)  # now idle and the latest: the cap counts the others
    assert pool.entries == [running, other]


def test_without_a_cap_idle_entries_stay_until_room_is_needed():
    pool, store = make(capacity=1000)
    entries = [compute(pool, store, [i] * 50)[0] for i in range(1, 8)]
    assert pool.entries == entries


def test_shared_prefixes_are_not_capped_and_conversations_count_only_their_own_positions():
    store = RecordingStore()
    pool = KVPool(store, capacity_tokens=10_000, max_entries=16, min_shared=4, copies_share=True, idle_tokens=25)
    system = list(range(100, 160))  # a 60-token prompt both conversations start with
    first, _ = compute(pool, store, system + [1] * 10)
    second, n = compute(pool, store, system + [2] * 10)
    shared = [e for e in pool.entries if e.shared]
    assert n == 60 and len(shared) == 1 and shared[0].tokens == system
    third, _ = compute(pool, store, system + [3] * 10)
    # each conversation holds 10 positions of its own: 20 behind the latest, under the cap
    assert first in pool.entries and second in pool.entries and third in pool.entries and shared[0] in pool.entries
    fourth, _ = compute(pool, store, system + [4] * 10)
    assert first not in pool.entries and shared[0] in pool.entries

"""Batching and KV reuse change nothing in the answers (both backends, tiny random model):
batched = one by one, cached prefix = computed from scratch, a conversation continued from its
kept KV state = recomputed, replies decoded together = decoded alone."""

from __future__ import annotations

import numpy as np
import pytest

from allinone.backends.base import SamplingParams

TOL = 2e-3  # log-prob tolerance: batch shapes change float summation order


def prompt(backend, system: str, text: str) -> list[int]:
    return backend.render_chat([{"role": "system", "content": system}, {"role": "user", "content": text}])


SYSTEM = "You are a careful classifier of the sentiment of short texts. Answer with one word."
TEXTS = ["good", "a very long and rather boring film, honestly", "这家酒店非常干净", "meh 😐"]


def labels(backend) -> list[list[int]]:
    conts = [backend.tokenize(w) for w in ("positive", "negative", " neutral-ish answer")]
    assert any(len(c) > 1 for c in conts)  # multi-token continuations are covered
    return conts


def alone(backend, requests) -> list[list[float]]:
    out = []
    for p, conts in requests:
        backend.kv.clear()
        out.append(backend.score(p, conts))
    return out


def test_batched_scores_equal_one_by_one(tiny_backend):
    b = tiny_backend
    conts = labels(b)
    requests = [(prompt(b, SYSTEM, t), conts) for t in TEXTS] + [(prompt(b, "Other task.", "good"), conts[:1])]
    expected = alone(b, requests)
    b.kv.clear()
    got = b.score_batch(requests)
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(expected), rtol=1e-4, atol=TOL)
    again = b.score_batch(requests)  # now from cached prefixes
    np.testing.assert_allclose(np.concatenate(again), np.concatenate(expected), rtol=1e-4, atol=TOL)


def test_relative_scores_rank_and_normalize_like_absolute_ones(tiny_backend):
    b = tiny_backend
    conts = labels(b)
    requests = [(prompt(b, SYSTEM, t), conts) for t in TEXTS]
    b.kv.clear()
    exact = b.score_batch(requests)
    relative = b.score_batch(requests, relative=True)
    for e, r in zip(exact, relative):
        np.testing.assert_allclose(np.array(r) - r[0], np.array(e) - e[0], atol=TOL)


def test_a_cached_task_prefix_gives_the_same_scores_and_saves_its_tokens(tiny_backend):
    b = tiny_backend
    conts = labels(b)
    first, second = prompt(b, SYSTEM, TEXTS[0]), prompt(b, SYSTEM, TEXTS[1])
    [fresh] = alone(b, [(second, conts)])
    b.kv.clear()
    b.score(first, conts)
    before = b.kv.cached_tokens
    cached = b.score(second, conts)
    shared = len(prompt(b, SYSTEM, "")) - 8  # at least the system turn and the user turn opener
    assert b.kv.cached_tokens - before >= shared
    np.testing.assert_allclose(cached, fresh, atol=TOL)


def test_the_task_prefix_survives_an_interleaved_chat(tiny_backend):
    b = tiny_backend
    conts = labels(b)
    b.kv.clear()
    b.score(prompt(b, SYSTEM, TEXTS[0]), conts)
    b.score(prompt(b, SYSTEM, TEXTS[1]), conts)
    chat = b.render_chat([{"role": "user", "content": "tell me a story"}])
    greedy(b, chat, 8)
    before = b.kv.cached_tokens
    b.score(prompt(b, SYSTEM, TEXTS[2]), conts)
    assert b.kv.cached_tokens - before >= len(prompt(b, SYSTEM, "")) - 8


def greedy(backend, prompt_ids, n=12) -> list[int]:
    gen = backend.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=n, repetition_penalty=1.0))
    try:
        return [next(gen) for _ in range(n)]
    finally:
        gen.close()


def test_a_conversation_continued_from_its_kv_state_equals_recomputing_it(tiny_backend):
    b = tiny_backend
    turn1 = [{"role": "user", "content": "hello there"}]
    b.kv.clear()
    reply = b.detokenize(greedy(b, b.render_chat(turn1)))
    turn2 = b.render_chat(turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}])
    before = b.kv.cached_tokens
    continued = greedy(b, turn2)
    reused = b.kv.cached_tokens - before
    assert reused >= len(b.render_chat(turn1)) - 1  # the first turn was not computed again
    b.kv.clear()
    assert greedy(b, turn2) == continued
    conts = labels(b)
    b.kv.clear()
    scratch = b.score(turn2, conts)
    greedy(b, turn2)
    np.testing.assert_allclose(b.score(turn2, conts), scratch, atol=TOL)


def test_replies_decoded_together_equal_replies_decoded_alone(tiny_backend):
    b = tiny_backend
    prompts = [b.render_chat([{"role": "user", "content": t}]) for t in TEXTS]
    sampling = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.0)
    expected = []
    for p in prompts:
        b.kv.clear()
        expected.append(greedy(b, p, 10))
    b.kv.clear()
    states = [b.start(p, sampling) for p in prompts]
    got = [[] for _ in prompts]
    try:
        while any(len(g) < 10 for g in got):
            for out, tok in zip(got, b.step(states)):
                if tok is not None and len(out) < 10:
                    out.append(tok)
    finally:
        for s in states:
            b.finish(s)
    assert got == expected


def test_sampled_replies_are_reproducible_with_a_seed_when_batched(tiny_backend):
    b = tiny_backend
    p = b.render_chat([{"role": "user", "content": "hi"}])
    sampling = SamplingParams(temperature=1.0, seed=7, max_tokens=8)
    b.kv.clear()
    gen = b.generate(p, sampling)
    alone_ids = [next(gen) for _ in range(8)]
    gen.close()
    b.kv.clear()
    states = [b.start(p, sampling), b.start(b.render_chat([{"role": "user", "content": "other"}]), sampling)]
    together = []
    while len(together) < 8:
        tok = b.step(states)[0]
        if tok is not None:  # None: the step computed a slice of a prompt
            together.append(tok)
    for s in states:
        b.finish(s)
    assert together == alone_ids


def test_the_context_window_is_enforced(tiny_backend):
    from allinone.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        tiny_backend.start([1] * tiny_backend.n_ctx, SamplingParams())


def test_task_prompts_leave_only_their_fixed_part_cached(tiny_backend):
    """Through the engine, score, encode and task-reply jobs of many texts leave the task's
    fixed prompt cached once and none of the texts (every cached cell costs attention time in
    llama.cpp's unified cache); a conversation's reply stays cached for its next turn."""
    from allinone.engine import TEXT_SLOT, EncodeJob, Engine, GenerateJob, Prompt, ScoreJob
    from allinone.engine.prompts import fit_prompt

    b = tiny_backend
    b.kv.clear()
    engine = Engine(b)  # not closed: the backend is session-wide
    try:
        task = ({"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Text: {TEXT_SLOT}\nAnswer:"})
        jobs = [ScoreJob(Prompt(messages=task, text=t), ("positive", "negative")) for t in TEXTS]
        jobs += [EncodeJob(Prompt(messages=task, text=t), layers=(1,), pooling="tokens") for t in TEXTS]
        jobs += [GenerateJob(Prompt(messages=task, text=t), SamplingParams(temperature=0, max_tokens=3)) for t in TEXTS[:2]]
        for handle in engine.submit_all(jobs):
            handle.result() if hasattr(handle, "result") else list(handle)
        fitted = fit_prompt(b, Prompt(messages=task, text="x"), reserve=1)
        assert [e.tokens for e in b.kv.entries] == [fitted.ids[: fitted.fixed]]
        conversation = GenerateJob(Prompt(messages=({"role": "user", "content": "tell me a story"},)),
                                   SamplingParams(temperature=0, max_tokens=3))
        list(engine.submit(conversation))
        assert len(b.kv.entries) == 2  # the conversation stays for its next turn
    finally:
        engine.stop()

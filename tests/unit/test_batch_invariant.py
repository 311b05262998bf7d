"""``batch_invariant``: a text's scores and states are the same alone and in a batch, exactly.

On llama.cpp the default mode is not (the tiny model's states differ by ~2e-4 between the two;
the embedded model's label probabilities by up to 0.07, docs/reliability.md), so the llama.cpp
case here fails without the setting."""

from __future__ import annotations

import numpy as np
import pytest

from allinone.types import SamplingParams

pytestmark = pytest.mark.tiny

TEXTS = ["great fun", "a dull, long and tiresome film that I would not watch again", "ok",
         "superb acting, weak plot, fine overall", "meh", "two thumbs up!", "不好看", "it was fine"]


@pytest.fixture(params=["llamacpp", "transformers"])
def invariant_backend(request, tiny_gguf_path, tiny_hf_dir):
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp")
        from allinone.backends.llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(tiny_gguf_path, n_ctx=512, model_id="tiny", batch_invariant=True)
    else:
        from allinone.backends.transformers import TransformersBackend

        backend = TransformersBackend(tiny_hf_dir, n_ctx=512, model_id="tiny", batch_invariant=True)
    yield backend
    backend.close()


def _prompts(backend):
    fixed = backend.tokenize("Decide whether the review is positive or negative, with care. Review: ")
    # texts of growing length, so that the batch's sequences sit at many places in the cache
    return fixed, [fixed + backend.tokenize(t + " x" * i) + backend.tokenize("\nAnswer:")
                   for i, t in enumerate(TEXTS * 2)]


def test_scores_and_states_are_the_same_alone_and_in_a_batch(invariant_backend):
    backend = invariant_backend
    fixed, prompts = _prompts(backend)
    labels = [backend.tokenize(w) for w in (" positive", " negative", " so-so, really", " mixed feelings", " not sure")]
    # multi-token labels take the second pass: 16 prompts x 5 labels need more than the 64 sequences
    assert min(map(len, labels)) > 1
    backend.cache_prefix(fixed)
    alone = [backend.score_batch_hidden([(p, labels)], [2, -1], keep=False) for p in prompts]
    batch_scores, batch_states = backend.score_batch_hidden([(p, labels) for p in prompts], [2, -1], keep=False)
    for (scores, states), b_scores, b_states in zip(alone, batch_scores, batch_states):
        np.testing.assert_array_equal(states[0], b_states)
        # the first label token's log-prob comes with the states, exactly; the later tokens of
        # a label were seen to round apart by ~1e-8 relative on the tiny model (cells of the
        # second pass land elsewhere), far inside the 1e-3 the issue asks of probabilities
        assert scores[0] == pytest.approx(b_scores, rel=1e-6)
    # an encode job after other work, and in reverse order: the same states again
    once = [backend.encode_batch([(p, len(fixed))], [1, -1], keep=False)[0] for p in prompts]
    together = backend.encode_batch([(p, len(fixed)) for p in reversed(prompts)], [1, -1], keep=False)[::-1]
    for a, b in zip(once, together):
        np.testing.assert_array_equal(a, b)


def test_what_ran_before_does_not_change_a_prompt(invariant_backend):
    """An earlier identical prompt is not reused (it would leave fewer tokens to compute, in
    other slices); only the declared prefix is, whole."""
    backend = invariant_backend
    fixed, prompts = _prompts(backend)
    backend.cache_prefix(fixed)
    first = backend.score_batch_hidden([(prompts[1], [[5]])], [-1], keep=True)
    backend.kv.prompt_tokens = backend.kv.cached_tokens = 0
    again = backend.score_batch_hidden([(prompts[1], [[5]])], [-1], keep=True)
    assert backend.kv.cached_tokens == len(fixed)
    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1][0], again[1][0])
    assert [e.tokens for e in backend.kv.entries if not e.shared] == []  # prompts are not kept


@pytest.mark.parametrize("backend_name", ["llamacpp", "transformers"])
def test_the_setting_reaches_the_backend(backend_name, tiny_gguf_path, tiny_hf_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from allinone import AllInOne

    model = tiny_gguf_path if backend_name == "llamacpp" else tiny_hf_dir
    with AllInOne.load(str(model), backend=backend_name, n_ctx=2048, cache_dir=tmp_path, batch_invariant=True,
                       learned=False) as ai:
        backend = ai._engine._backend  # the test's view of what serves the requests
        assert backend.batch_invariant and backend.kv.declared_only
        alone = [ai.run("sentiment", t).scores for t in TEXTS]
        for a, b in zip(alone, [r.scores for r in ai.run_many("sentiment", TEXTS)]):
            assert a == pytest.approx(b, rel=1e-6)


def _decode(backend, prompts, sampling, n, *, together):
    """``n`` tokens of a reply to each prompt, one reply after another or all at once; returns
    each reply's tokens and the logits every token was picked from."""
    from allinone.backends import base

    seen: dict[int, list[np.ndarray]] = {}
    pick = base.sample

    def spy(logits, sampling, history, rng, allowed=None, **kwargs):
        seen.setdefault(id(history), []).append(np.array(logits, copy=True))
        return pick(logits, sampling, history, rng, allowed, **kwargs)

    base.sample = spy
    try:
        groups = [prompts] if together else [[p] for p in prompts]
        out, alive = [], []  # states outlive the loop: ids of their histories key ``seen``
        for group in groups:
            states = [backend.start(p, sampling) for p in group]
            alive += states
            got = {id(s): [] for s in states}
            running = list(states)
            try:
                while running:  # a reply with n tokens is finished, as the engine retires it
                    for s, tok in zip(list(running), backend.step(running)):
                        if tok is not None:
                            got[id(s)].append(tok)
                        if len(got[id(s)]) == n:
                            backend.finish(s)
                            running.remove(s)
            finally:
                for s in running:
                    backend.finish(s)
            out += [(got[id(s)], seen[id(s.history)]) for s in states]
        return out
    finally:
        base.sample = pick


def test_greedy_replies_are_the_same_alone_and_together(invariant_backend):
    """A greedy reply's tokens and the logits they were picked from are bit for bit the same
    decoded alone and beside other replies, with other work cached around them. On llama.cpp
    this needs the solo context (without it the logits differ: a reply's cells sit among the
    others' in the unified cache)."""
    backend = invariant_backend
    fixed, prompts = _prompts(backend)
    backend.cache_prefix(fixed)
    # other work first: cached prefixes and freed prompts leave cells in use and holes
    backend.score_batch_hidden([(p, [[5]]) for p in prompts], [-1], keep=True)
    chats = [backend.tokenize(f"User: {t}{' x' * i}\nAssistant:") for i, t in enumerate(TEXTS)]
    sampling = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.0)
    alone = _decode(backend, chats, sampling, 24, together=False)
    together = _decode(backend, chats, sampling, 24, together=True)
    for (a_ids, a_logits), (b_ids, b_logits) in zip(alone, together):
        assert a_ids == b_ids
        for x, y in zip(a_logits, b_logits):
            np.testing.assert_array_equal(x, y)

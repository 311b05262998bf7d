"""The transformers backend's batched scoring (TransformersBackend.score_batch): one padded forward
pass for the prompts of a call, only the labels' output-head rows with ``relative=True``, the
same answers as one sequence at a time, and the same KV pool state as the generic implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allinone.backends.base import Backend  # noqa: E402
from allinone.errors import InvalidInputError  # noqa: E402

TOL = 1e-4  # log-probs, FP32: batch shapes only change the float summation order

SYSTEM = "You are a careful classifier of the sentiment of short texts. Answer with one word."
TEXTS = ["good", "a very long and rather boring film, honestly", "这家酒店非常干净", "meh 😐 ok"]


def load(tiny_hf_dir):
    from allinone.backends.transformers import TransformersBackend

    return TransformersBackend(tiny_hf_dir, n_ctx=512, n_threads=1, model_id="tiny")


@pytest.fixture
def backend(tiny_hf_dir):
    b = load(tiny_hf_dir)
    yield b
    b.close()


@pytest.fixture
def reference(tiny_hf_dir):
    """Another backend on the same model, for one-request-at-a-time answers."""
    b = load(tiny_hf_dir)
    yield b
    b.close()


def prompt(b, system: str, text: str) -> list[int]:
    return b.render_chat([{"role": "system", "content": system}, {"role": "user", "content": text}])


def labels(b) -> list[list[int]]:
    conts = [b.tokenize(w) for w in ("positive", "negative", " neutral-ish answer", " no")]
    assert any(len(c) == 1 for c in conts) and any(len(c) > 2 for c in conts)
    return conts


def task_requests(b, texts=TEXTS, conts=None):
    conts = labels(b) if conts is None else conts
    return [(prompt(b, SYSTEM, t), conts) for t in texts]


def one_by_one(b, requests) -> list[list[float]]:
    """score() per request on an empty pool: the unbatched ground truth."""
    out = []
    for p, conts in requests:
        b.kv.clear()
        out.append(b.score(p, conts))
    b.kv.clear()
    return out


def normalized(scores: list[float]) -> np.ndarray:
    """log-softmax over one request's continuations: removes any per-request constant."""
    s = np.asarray(scores, dtype=np.float64)
    return s - (s.max() + math.log(np.exp(s - s.max()).sum()))


class Calls:
    """Records the inputs of the decoder (``model.model``) and the output head (``model.lm_head``)."""

    def __init__(self, b):
        self.decoder: list[tuple[int, int]] = []  # input_ids shapes
        self.head: list[tuple[int, ...]] = []  # lm_head input shapes
        self._hooks = [
            b.model.model.register_forward_pre_hook(self._on_decoder, with_kwargs=True),
            b.model.lm_head.register_forward_pre_hook(self._on_head),
        ]

    def _on_decoder(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.decoder.append(tuple(ids.shape))

    def _on_head(self, module, args):
        self.head.append(tuple(args[0].shape))

    def clear(self):
        self.decoder.clear()
        self.head.clear()

    def close(self):
        for h in self._hooks:
            h.remove()


@pytest.fixture
def calls(backend):
    c = Calls(backend)
    yield c
    c.close()


# -- batched == unbatched ------------------------------------------------------------------------
def test_batched_scores_equal_one_by_one(backend, reference):
    conts = labels(backend)
    other = (prompt(backend, "Translate to French.", "a text that shares no task prefix"), conts[:2])
    requests = task_requests(backend, conts=conts) + [other]
    want = one_by_one(reference, requests)
    got = backend.score_batch(requests)  # computes the task prefix once, then everything batched
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=TOL, rtol=0)
    again = backend.score_batch(requests)  # now every prompt starts from a cached prefix
    np.testing.assert_allclose(np.concatenate(again), np.concatenate(want), atol=TOL, rtol=0)
    assert all(lp < 0 for lp in np.concatenate(got))


def test_relative_scores_equal_one_by_one_up_to_a_constant_per_request(backend, reference):
    conts = labels(backend)
    requests = task_requests(backend, conts=conts) + [(prompt(backend, "Other task.", "good"), conts[1:])]
    want = one_by_one(reference, requests)
    got = backend.score_batch(requests, relative=True)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        np.testing.assert_allclose(normalized(g), normalized(w), atol=TOL, rtol=0)
        np.testing.assert_allclose(np.subtract(g, g[0]), np.subtract(w, w[0]), atol=TOL, rtol=0)


def test_a_batch_mixing_cached_prefixes_is_one_forward_and_still_exact(backend, reference, calls):
    """Rows starting from different cached prefixes (here: none, and the task's) share one pass:
    shorter prefixes are zero-filled and masked in the batch cache."""
    conts = [c[:1] for c in labels(backend)]  # single tokens: no second pass
    requests = task_requests(backend, conts=conts)
    backend.score_batch(requests[:2])  # caches the task prefix
    lone = (prompt(backend, "Quite another system prompt.", "x"), conts)
    mixed = requests[2:] + [lone]
    backend.score_pad_waste = float("inf")  # keep the long uncached prompt in the same pass
    calls.clear()
    got = backend.score_batch(mixed)
    assert [shape[0] for shape in calls.decoder] == [len(mixed)]
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(one_by_one(reference, mixed)), atol=TOL, rtol=0)


def test_splitting_a_call_into_several_passes_changes_nothing(backend, reference, calls):
    requests = task_requests(backend)
    want = one_by_one(reference, requests)
    backend.score_batch_tokens = 1  # every prompt and every multi-token label in a pass of its own
    got = backend.score_batch(requests)
    n_multi = sum(len(c) > 1 for c in labels(backend)) * len(requests)
    assert len(calls.decoder) == 1 + len(requests) + n_multi  # + the task prefix, computed once
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=TOL, rtol=0)


# -- one forward pass ---------------------------------------------------------------------------
def test_the_prompts_of_a_call_are_one_padded_forward(backend, calls):
    conts = labels(backend)
    requests = task_requests(backend, conts=conts)
    backend.score_batch(task_requests(backend, ["warm", "up"], conts))  # caches the task prefix
    shared = next(e for e in backend.kv.entries if e.shared)
    calls.clear()
    backend.score_batch(requests)
    multi = [c for c in conts if len(c) > 1]
    suffixes = [len(p) - len(shared.tokens) for p, _ in requests]
    # pass 1: every prompt's uncached rest, right-padded; pass 2: every multi-token label's inner tokens
    assert calls.decoder == [(len(requests), max(suffixes)),
                             (len(requests) * len(multi), max(len(c) - 1 for c in multi))]


# -- output head: label rows only with relative=True ----------------------------------------------
def test_relative_scoring_computes_only_the_label_rows_of_the_head(backend, reference, calls):
    single = [c[:1] for c in labels(backend)]
    requests = task_requests(backend, conts=single)
    # (caching the task prefix runs Backend.forward, which computes that prefix's last logits)
    backend.score_batch(task_requests(backend, ["warm", "up"], single), relative=True)
    calls.clear()
    got = backend.score_batch(requests, relative=True)
    assert calls.head == []  # the full (n_vocab x hidden) head never ran
    exact = one_by_one(reference, requests)
    for g, e in zip(got, exact):  # the label probabilities are the full computation's
        np.testing.assert_allclose(normalized(g), normalized(e), atol=TOL, rtol=0)
        np.testing.assert_allclose(np.exp(normalized(g)).sum(), 1.0, atol=1e-9)


def test_inner_label_tokens_get_the_full_head_and_only_at_real_positions(backend, calls):
    conts = labels(backend)
    requests = task_requests(backend, conts=conts)
    backend.score_batch(task_requests(backend, ["warm", "up"], conts[:1]))  # caches the task prefix
    calls.clear()
    backend.score_batch(requests, relative=True)
    inner = sum(len(c) - 1 for c in conts) * len(requests)
    assert calls.head == [(inner, backend.model.config.hidden_size)]
    calls.clear()
    backend.score_batch(requests)  # exact: the full head for the last prompt positions too
    assert calls.head == [(len(requests), backend.model.config.hidden_size),
                          (inner, backend.model.config.hidden_size)]


def test_relative_first_tokens_are_logits_of_the_full_head(backend):
    """A relative first-token score is hidden @ W[row] + bias: the full head's logit, i.e. the
    exact log-prob shifted by the request's log-normalizer."""
    single = [c[:1] for c in labels(backend)]
    requests = task_requests(backend, TEXTS[:2], single)
    exact = backend.score_batch(requests)
    relative = backend.score_batch(requests, relative=True)
    for e, r in zip(exact, relative):
        shift = np.subtract(r, e)
        np.testing.assert_allclose(shift, shift[0], atol=TOL, rtol=0)
        assert shift[0] > 0  # logsumexp over the vocabulary


# -- the KV pool ------------------------------------------------------------------------------
def pool_state(b):
    return sorted((tuple(e.tokens), e.shared, e.in_use) for e in b.kv.entries), b.kv.prompt_tokens, b.kv.cached_tokens


def test_the_pool_ends_as_the_generic_implementation_leaves_it(backend, reference):
    conts = labels(backend)
    calls_ = [
        task_requests(backend, TEXTS[:3], conts),  # a batch: the task prefix is cached first
        [(prompt(backend, SYSTEM, "one alone"), conts)],  # a single prompt from the cached prefix
        [(prompt(backend, "Some other task entirely.", "solo"), conts[:1])],  # nothing cached: kept whole
        [(prompt(backend, "Some other task entirely.", "second"), conts[:2]),  # shares with the kept one
         (prompt(backend, SYSTEM, TEXTS[3]), conts)],
        task_requests(backend, TEXTS, conts),
    ]
    for requests in calls_:
        got = backend.score_batch(requests, relative=True)
        want = Backend.score_batch(reference, requests, relative=True)  # the generic path
        for g, w in zip(got, want):
            np.testing.assert_allclose(normalized(g), normalized(w), atol=TOL, rtol=0)
        assert pool_state(backend) == pool_state(reference)
    assert not any(e.in_use for e in backend.kv.entries)


def test_a_second_batch_of_the_task_computes_only_the_suffixes(backend, calls):
    conts = [c[:1] for c in labels(backend)]
    backend.score_batch(task_requests(backend, TEXTS[:2], conts))
    [shared] = [e for e in backend.kv.entries if e.shared]
    assert prompt(backend, SYSTEM, "anything")[: len(shared.tokens)] == shared.tokens
    assert len(shared.tokens) >= backend.kv.min_shared
    before_prompt, before_cached = backend.kv.prompt_tokens, backend.kv.cached_tokens
    calls.clear()
    requests = task_requests(backend, TEXTS[2:], conts)
    backend.score_batch(requests)
    assert backend.kv.cached_tokens - before_cached == len(requests) * len(shared.tokens)
    assert backend.kv.prompt_tokens - before_prompt == sum(len(p) for p, _ in requests)
    assert calls.decoder == [(len(requests), max(len(p) - len(shared.tokens) for p, _ in requests))]
    assert [e for e in backend.kv.entries if e.shared] == [shared]  # the prefix entry stays, alone


def test_a_kept_prompt_holds_its_kv_and_is_continued_exactly(backend, reference):
    """Prompts with no cached prefix keep their entry (as in the generic path): its KV state,
    written from the batch cache, continues a longer prompt as well as a fresh computation."""
    conts = labels(backend)
    a = prompt(backend, "First unrelated system prompt.", "alpha")
    b = prompt(backend, "Second, different one; longer 中文.", "beta")
    backend.score_batch(task_requests(backend, ["warm", "up"], conts))  # caches the task prefix
    backend.score_pad_waste = float("inf")  # one pass: the kept rows sit after a zero-filled prefix gap
    backend.score_batch([(a, conts), (b, conts)] + task_requests(backend, TEXTS[:1], conts))
    kept = {tuple(e.tokens) for e in backend.kv.entries if not e.shared}
    assert {tuple(a), tuple(b)} <= kept
    longer = b + backend.tokenize(" and a follow-up")
    before = backend.kv.cached_tokens
    got = backend.score(longer, conts)
    assert backend.kv.cached_tokens - before == len(b)  # continued in place
    [want] = one_by_one(reference, [(longer, conts)])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_a_batch_whose_prefix_copies_exceed_the_kv_budget_still_runs(tiny_hf_dir, reference):
    """16 prompts x a cached prefix of ~90 tokens > the 512-position budget: the prompts' prefix
    copies are never all counted at once, and the batch caches are split to stay within it."""
    from allinone.backends.transformers import TransformersBackend

    small = TransformersBackend(tiny_hf_dir, n_ctx=512, n_threads=1, kv_cache_mb=0.01)
    try:
        assert small.kv.capacity_tokens == 512
        system = SYSTEM + " " + SYSTEM
        requests = [(prompt(small, system, f"text number {i}"), [small.tokenize(" yes")]) for i in range(16)]
        got = small.score_batch(requests)
        [shared] = [e for e in small.kv.entries if e.shared]
        assert len(requests) * len(shared.tokens) > small.kv.capacity_tokens
        want = one_by_one(reference, requests)
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=TOL, rtol=0)
        assert small.kv.used_tokens <= small.kv.capacity_tokens
    finally:
        small.close()


def test_bad_requests_are_rejected_and_leave_no_entry_in_use(backend):
    conts = labels(backend)
    long_label = [conts[0][0]] * 20
    p = prompt(backend, SYSTEM, "x")
    over = [1] * (backend.n_ctx - len(long_label) + 1 - len(p)) + p  # prefix fits, prefix + label does not
    for requests in ([([], conts)], [(p, [[]])], [(p, conts), (over, [long_label])], [([1] * backend.n_ctx, conts)]):
        with pytest.raises(InvalidInputError):
            backend.score_batch(requests)
        assert not any(e.in_use for e in backend.kv.entries)
    assert backend.score_batch([]) == []

"""Hidden states (the encode job) on both backends over the same tiny random model: equal to
the reference forward pass of transformers, equal across backends, with or without a cached
prefix, and with exact character offsets for the text's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allinone.engine import TEXT_SLOT, EncodeJob, Engine, Prompt, ScoreJob
from allinone.engine.prompts import token_offsets

TEXT = "Ann  met 北京的 Bob 😀 at ２００ pm"
PROMPT = Prompt(messages=({"role": "system", "content": "Read the text."},
                          {"role": "user", "content": f"<t>{TEXT_SLOT}</t>\nAgain: {TEXT_SLOT}"}), text=TEXT)


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def reference(model, ids: list[int]) -> list[np.ndarray]:
    """hidden_states of one full forward pass: [embeddings, after block 1, ..., final normalized]."""
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("layers", [(1,), (2, -1)])
def test_encode_batch_equals_the_reference_forward_pass(tiny_backend, hf_model, layers):
    b = tiny_backend
    ids = b.render_chat([{"role": "user", "content": "hello there, 你好 😀"}])
    b.kv.clear()
    (states,) = b.encode_batch([(ids, 3)], layers)
    ref = reference(hf_model, ids)
    assert states.shape == (len(layers), len(ids) - 3, b.hidden_size)
    for k, layer in enumerate(layers):
        want = ref[b.layer_index(layer)][3:]
        assert np.allclose(states[k], want, atol=2e-3), (layer, np.abs(states[k] - want).max())


def test_a_cached_prefix_gives_the_same_states(tiny_backend):
    b = tiny_backend
    ids = b.render_chat([{"role": "system", "content": "A long fixed prefix " * 4},
                         {"role": "user", "content": "the text"}])
    b.kv.clear()
    (cold,) = b.encode_batch([(ids, len(ids) - 4)], (2,))
    b.score(ids, [[5]])  # leaves the prompt's prefix cached
    before = b.kv.cached_tokens
    (warm,) = b.encode_batch([(ids, len(ids) - 4)], (2,))
    assert b.kv.cached_tokens > before  # the prefix came from the cache
    assert np.allclose(cold, warm, atol=1e-4)


def test_prompts_of_a_batch_compute_what_they_share_once(tiny_backend):
    """Two prompts that share a long stem before the states they read (one text read in two
    ways after a first copy, as the Chinese tagger does) compute the stem once, get the states
    they get alone, and leave no stem cached after the batch."""
    b = tiny_backend
    stem = b.render_chat([{"role": "user", "content": "a first copy of a text that both prompts share " * 2}],
                         add_generation_prompt=False)
    a, c = stem + b.tokenize("read it one way"), stem + b.tokenize("或者另一种方式 read")
    b.kv.clear()
    alone = []
    for ids in (a, c):
        b.kv.clear()
        alone.append(b.encode_batch([(ids, len(stem))], (1, -1), keep=False)[0])
    b.kv.clear()
    computed = []
    forward_hidden = b.forward_hidden
    b.forward_hidden = lambda entries, new, *args, **kw: (computed.extend(map(len, new)),
                                                          forward_hidden(entries, new, *args, **kw))[1]
    try:
        together = b.encode_batch([(a, len(stem)), (c, len(stem))], (1, -1), keep=False)
    finally:
        del b.forward_hidden
    assert sum(computed) == len(a) + len(c) - len(stem)
    for x, y in zip(alone, together):
        assert np.allclose(x, y, atol=1e-4), np.abs(x - y).max()
    assert b.kv.entries == []


def test_score_job_states_equal_encode_job_last_token(tiny_backend):
    engine = Engine(tiny_backend)  # not closed: the backend is session-wide
    scored = engine.run(ScoreJob(PROMPT, ("yes", "no"), layers=(2,)))
    encoded = engine.run(EncodeJob(PROMPT, layers=(2,), pooling="last"))
    assert scored.hidden.shape == (1, tiny_backend.hidden_size)
    assert np.allclose(scored.hidden, encoded.states, atol=1e-4)


def test_token_pooling_reads_the_last_copy_with_exact_offsets(tiny_backend, hf_model):
    engine = Engine(tiny_backend)
    out = engine.run(EncodeJob(PROMPT, layers=(1, -1), pooling="tokens"))
    n = len(out.token_ids)
    assert out.states.shape == (2, n, tiny_backend.hidden_size) and n == len(tiny_backend.tokenize(TEXT))
    # every character is covered, in order, and the pieces spell the text
    assert out.offsets[0][0] == 0 and out.offsets[-1][1] == len(TEXT)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(out.offsets, out.offsets[1:]))
    assert b"".join(tiny_backend.token_bytes(out.token_ids)).decode("utf-8") == TEXT
    # the states are those of the second copy: they saw the whole text once already
    ids = tiny_backend.render_chat([{"role": "system", "content": "Read the text."},
                                    {"role": "user", "content": f"<t>{TEXT}</t>\nAgain: {TEXT}"}])
    ref = reference(hf_model, ids)[1]
    text_ids = list(out.token_ids)
    start = max(i for i in range(len(ids)) if ids[i:i + n] == text_ids)
    assert np.allclose(out.states[0], ref[start:start + n], atol=2e-3)
    mean = engine.run(EncodeJob(PROMPT, layers=(1,), pooling="mean"))
    assert np.allclose(mean.states[0], out.states[0].mean(axis=0), atol=1e-5)



def test_natural_copies_split_only_the_copy_that_is_read(tiny_backend):
    """With ``split_chars`` and ``natural_copies`` the earlier copy of the text is tokenized as
    usual and only the last one a token per CJK character; a text cut to fit is cut the same
    in both copies."""
    from allinone.engine.prompts import fit_prompt, split_cjk

    b = tiny_backend
    text = "这部电影非常好看 and 我们去公园散步吧"
    echo = f"Text: {TEXT_SLOT}\nAgain: {TEXT_SLOT}"
    natural, split = b.tokenize(text), split_cjk(b, text)
    assert len(natural) < len(split)  # the tiny tokenizer merges some of these characters
    fitted = fit_prompt(b, Prompt(raw=echo, text=text, split_chars=True, natural_copies=True), reserve=0)
    first = b.tokenize("Text: ")
    assert fitted.ids[len(b.bos_ids) + len(first):][: len(natural)] == natural
    start, end = fitted.text_span
    assert fitted.ids[start:end] == split and fitted.text_ids == split
    cut = fit_prompt(b, Prompt(raw=echo, text=text, split_chars=True, natural_copies=True, max_text_tokens=6),
                     reserve=0)
    seen = cut.info.text
    assert cut.info.truncated and text.startswith(seen) and cut.text_ids == split_cjk(b, seen)
    assert cut.ids[len(b.bos_ids) + len(first):][: len(b.tokenize(seen))] == b.tokenize(seen)
    both = fit_prompt(b, Prompt(raw=echo, text=text, split_chars=True), reserve=0)
    assert both.ids[len(b.bos_ids) + len(first):][: len(split)] == split  # without: every copy is split

def test_offsets_of_hard_text(tiny_backend):
    for text in ["北京欢迎你", "emoji 😀👍🏽 here", "  two  spaces ", "２００８年"]:
        ids = tiny_backend.tokenize(text)
        offsets = token_offsets(tiny_backend, text, ids)
        assert len(offsets) == len(ids)
        covered = sorted({i for a, b in offsets for i in range(a, b)})
        assert covered == list(range(len(text)))
        raw = b"".join(tiny_backend.token_bytes(ids))
        assert raw == text.encode("utf-8")


def test_both_backends_give_the_same_states(tiny_llamacpp, tiny_transformers):
    ids = tiny_llamacpp.render_chat([{"role": "user", "content": "same states, 同样的"}])
    out = []
    for b in (tiny_llamacpp, tiny_transformers):
        b.kv.clear()
        out.append(b.encode_batch([(ids, 0)], (1, 2, -1))[0])
    assert np.allclose(out[0], out[1], atol=2e-3)


def test_a_last_token_state_of_the_final_layer_makes_one_output_row(tiny_llamacpp, hf_model):
    # every output position costs llama.cpp an output-head multiply and a logits row: a head that
    # reads the last token's final state must not make the whole prompt an output
    b = tiny_llamacpp
    ids = b.render_chat([{"role": "user", "content": "one output row, 一个"}])
    b.kv.clear()
    _, states = b.score_batch_hidden([(ids, [[5], [6]])], (1, -1))
    batch = b._batch
    assert batch.n_tokens == len(ids)
    assert sum(bool(batch.logits[k]) for k in range(batch.n_tokens)) == 1
    ref = reference(hf_model, ids)
    assert np.allclose(states[0][0], ref[1][-1], atol=2e-3)
    assert np.allclose(states[0][1], ref[-1][-1], atol=2e-3)
    b.kv.clear()
    (last,) = b.encode_batch([(ids, len(ids) - 1)], (-1,))
    assert sum(bool(batch.logits[k]) for k in range(batch.n_tokens)) == 1
    assert last.shape == (1, 1, b.hidden_size) and np.allclose(last[0, 0], ref[-1][-1], atol=2e-3)

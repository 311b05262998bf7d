"""The engine: one worker thread, a bounded fair queue, micro-batched scoring, continuous
batching of replies, cancellation, and errors that don't kill it. All on plain jobs."""

from __future__ import annotations

import threading
import time

import pytest

from allinone.engine import TEXT_SLOT, Engine, GenerateJob, Prompt, ScoreJob, TokenizeJob, core
from allinone.errors import CancelledError, InvalidInputError, OverloadedError, RequestTimeoutError, ShuttingDownError
from allinone.types import SamplingParams
from fixtures.fakes import FakeBackend

GREEDY = SamplingParams(temperature=0, max_tokens=10_000)
HI = Prompt(messages=({"role": "user", "content": "hi"},))


def reply(engine: Engine, max_tokens: int = 10_000, prompt: Prompt = HI):
    return engine.submit(GenerateJob(prompt, GREEDY.updated(max_tokens=max_tokens)))


def score(engine: Engine, text: str = "positive"):
    out = engine.run(ScoreJob(Prompt(messages=({"role": "user", "content": text},)), (text,)))
    return text, list(out.logprobs)


def in_threads(fns):
    results = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i, f=f: results.__setitem__(i, f())) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, results


def test_all_work_runs_on_one_worker_thread():
    backend = FakeBackend()
    engine = Engine(backend)
    threads, results = in_threads([lambda: score(engine)] * 4 + [lambda: "".join(d.text for d in reply(engine))] * 4)
    for t in threads:
        t.join()
    assert results[:4] == [("positive", [-10.0])] * 4 and results[4:] == ["ok"] * 4
    assert backend.threads == {"allinone-engine"}
    engine.close()
    assert backend.closed


def test_score_jobs_waiting_together_run_as_one_batch():
    backend = FakeBackend(label_logps={"a": -1.0, "b": -2.0})
    engine = Engine(backend, max_batch=4)
    backend.gate.clear()
    blocker = reply(engine, max_tokens=1)  # holds the worker in a decode step
    next_piece = threading.Thread(target=lambda: list(blocker))
    next_piece.start()
    time.sleep(0.1)
    threads, results = in_threads([lambda t=t: score(engine, t) for t in "ababab"])
    time.sleep(0.2)  # all six are queued behind the blocked step
    backend.gate.set()
    for t in threads:
        t.join()
    next_piece.join()
    assert results == [(t, [-1.0 if t == "a" else -2.0]) for t in "ababab"]  # each got its own answer
    assert backend.batches == [4, 2]  # max_batch, then the rest
    assert engine.stats().batch_sizes == {4: 1, 2: 1}
    engine.close()


def test_jobs_submitted_together_share_a_batch():
    backend = FakeBackend(label_logps={"a": -1.0, "b": -2.0})
    engine = Engine(backend)
    jobs = [ScoreJob(Prompt(messages=({"role": "user", "content": t},)), (t,)) for t in "abab"]
    outs = [h.result() for h in engine.submit_all(jobs)]
    assert [o.logprobs for o in outs] == [(-1.0,), (-2.0,), (-1.0,), (-2.0,)]
    assert backend.batches == [4]
    engine.close()


def test_replies_are_decoded_together_and_a_long_one_does_not_block_a_short_one():
    backend = FakeBackend("y" * 10_000, end=False, step_delay=0.002)
    engine = Engine(backend, max_active=4)
    long_reply = reply(engine)
    first = next(iter(long_reply))  # the long reply is running
    assert first.text == "y"
    t0 = time.monotonic()
    short = "".join(d.text for d in reply(engine, max_tokens=3))
    label = score(engine)
    assert short == "yyy" and label == ("positive", [-10.0])
    assert time.monotonic() - t0 < 5  # both done while the long reply still runs
    assert max(backend.steps) == 2  # the short reply shared decode steps with the long one
    assert engine.stats().active_replies == 1
    long_reply.close()
    engine.close()


def test_more_replies_than_max_active_wait_their_turn():
    backend = FakeBackend("abc")
    engine = Engine(backend, max_active=2)
    backend.gate.clear()
    threads, results = in_threads([lambda: "".join(d.text for d in reply(engine))] * 5)
    time.sleep(0.2)
    backend.gate.set()
    for t in threads:
        t.join()
    assert results == ["abc"] * 5
    assert max(backend.steps) == 2
    engine.close()


def test_queue_bound_rejects_at_once():
    backend = FakeBackend()
    engine = Engine(backend, max_queue=2)
    backend.gate.clear()  # the worker blocks inside the first decode step
    first = reply(engine)
    consumer = threading.Thread(target=lambda: list(first))
    consumer.start()
    time.sleep(0.1)  # let the worker pick the first job up
    threads, results = in_threads([lambda: engine.run(TokenizeJob("a"))] * 2)
    time.sleep(0.1)
    with pytest.raises(OverloadedError):
        engine.run(TokenizeJob("a"))
    backend.gate.set()
    consumer.join()
    for t in threads:
        t.join()
    assert results == [[97], [97]]
    assert engine.run(TokenizeJob("*")) == [42]  # serving again once the queue drained
    assert engine.stats().queue_depth == 0
    engine.close()


def test_jobs_run_in_arrival_order():
    backend = FakeBackend()
    engine = Engine(backend)
    backend.gate.clear()
    blocker = reply(engine, max_tokens=1)
    consumer = threading.Thread(target=lambda: list(blocker))
    consumer.start()
    time.sleep(0.1)
    handles = [engine.submit(TokenizeJob(str(i))) for i in range(5)]
    order = []
    backend.calls.clear()
    backend.gate.set()
    for h in handles:
        order.append(h.result())
    consumer.join()
    assert order == [[ord(str(i))] for i in range(5)]
    engine.close()


def test_an_error_reaches_the_caller_and_the_worker_keeps_serving():
    engine = Engine(FakeBackend(n_ctx=64))
    long = Prompt(messages=({"role": "system", "content": "s" * 200}, {"role": "user", "content": "hi"}))
    with pytest.raises(InvalidInputError):
        list(reply(engine, prompt=long))  # the system prompt alone does not fit
    with pytest.raises(InvalidInputError):
        engine.run(ScoreJob(Prompt(messages=({"role": "system", "content": "s" * 200},
                                              {"role": "user", "content": TEXT_SLOT}), text="x"), ("a",)))
    with pytest.raises(TypeError):
        engine.submit("not a job")
    assert engine.run(TokenizeJob("ok")) == [111, 107]
    assert score(engine) == ("positive", [-10.0])
    engine.close()


def test_closing_a_stream_cancels_generation():
    backend = FakeBackend("y" * 10_000, step_delay=0.001)
    engine = Engine(backend)
    stream = reply(engine)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    engine.run(TokenizeJob("sync"))  # the worker has moved on
    time.sleep(0.05)
    assert backend.generated < 1000  # the worker stopped early
    assert backend.finished == 1  # and released the sequence
    engine.close()


def test_jobs_cancelled_before_they_start_end_for_their_readers():
    """A reader that cancels a reply before reading it sees the stream end (it used to wait
    forever: a fresh user's `s = ai.chat(..., stream=True); s.cancel(); list(s)` hung)."""
    backend = FakeBackend("y" * 100, step_delay=0.001)
    engine = Engine(backend, max_active=1)
    backend.gate.clear()  # the worker blocks inside the first reply's decode step
    first = reply(engine, max_tokens=5)
    deadline = time.monotonic() + 5
    while not backend.steps and time.monotonic() < deadline:
        time.sleep(0.01)
    second = reply(engine)  # waits: one reply at a time
    pending = engine.submit(ScoreJob(Prompt(messages=({"role": "user", "content": "x"},)), ("x",)))
    second.cancel()
    pending.cancel()
    backend.gate.set()
    ended: list = []
    reader = threading.Thread(target=lambda: ended.append(list(second)), daemon=True)
    reader.start()
    reader.join(5)
    assert ended == [[]]  # ended, nothing generated
    with pytest.raises(CancelledError):
        pending.result()
    assert "".join(d.text for d in first) == "yyyyy"  # the reply that ran is untouched
    engine.close()


def test_a_reply_of_written_words_only_is_sent_without_computing_its_prompt():
    backend = FakeBackend("model words")
    engine = Engine(backend)
    prompt = Prompt(messages=({"role": "user", "content": "My dog died."},), reply_prefix="So sorry.")
    stream = engine.submit(GenerateJob(prompt, GREEDY, written_only=True))
    deltas = list(stream)
    assert "".join(d.text for d in deltas) == "So sorry." and deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == len("So sorry.")  # the fake's tokens are characters
    assert stream.info.prompt_tokens > 0 and "generate" not in backend.calls
    capped = list(engine.submit(GenerateJob(prompt, GREEDY.updated(max_tokens=3), written_only=True)))
    assert "".join(d.text for d in capped) == "So " and capped[-1].finish_reason == "length"
    engine.close()


def test_timeout_is_reported():
    backend = FakeBackend()
    engine = Engine(backend, timeout=0.2)
    backend.gate.clear()
    with pytest.raises(RequestTimeoutError):
        list(reply(engine))
    backend.gate.set()
    assert engine.run(TokenizeJob("a"), timeout=5) == [97]
    engine.close()


def test_a_reader_behind_its_stream_learns_that_it_timed_out():
    """Pieces already queued when the deadline passes are still read, then the timeout: not a
    clean end without a finish reason (a fresh user's slow reader saw one in 3 of 3 runs)."""
    backend = FakeBackend("y" * 10_000, end=False, step_delay=0.002)
    engine = Engine(backend)
    stream = engine.submit(GenerateJob(HI, GREEDY), timeout=0.3)
    pieces = 0
    with pytest.raises(RequestTimeoutError):
        for _ in stream:
            pieces += 1
            time.sleep(0.05)  # reads slower than the worker writes
    assert pieces > 1
    engine.close()


def test_closing_fails_running_and_queued_work_and_frees_the_model_after_the_worker_stops():
    """A server stopped during a long reply freed llama.cpp's model under the running decode
    and crashed (exit 139) after waiting for it; now what is left fails at once."""
    backend = FakeBackend("y" * 10_000, end=False, step_delay=0.01)
    engine = Engine(backend, max_active=1)
    running, queued = reply(engine), reply(engine)  # max_active 1: the second waits
    next(iter(running))
    started = time.monotonic()
    engine.close(grace=0)
    assert time.monotonic() - started < 2
    for stream in (running, queued):
        with pytest.raises(ShuttingDownError):
            list(stream)
    assert backend.closed and backend.finished == 1  # the running reply's sequence was released
    with pytest.raises(ShuttingDownError):
        reply(engine)


def test_closing_lets_work_finish_within_the_grace_period():
    engine = Engine(FakeBackend("hello", step_delay=0.01))
    stream = reply(engine)
    engine.close(grace=10)
    assert "".join(d.text for d in stream) == "hello"


def test_the_model_is_never_freed_while_the_worker_computes(monkeypatch, caplog):
    backend = FakeBackend("y" * 100, end=False)
    engine = Engine(backend)
    stream = reply(engine)
    next(iter(stream))
    backend.gate.clear()  # the next decode step hangs, as a long llama_decode would
    time.sleep(0.05)
    monkeypatch.setattr(core, "_ABORT_JOIN_S", 0.2)
    engine.close(grace=0)
    assert not backend.closed and "did not stop" in caplog.text
    backend.gate.set()  # the step ends: the worker fails the reply and stops
    with pytest.raises(ShuttingDownError):
        list(stream)
    engine.close()
    assert backend.closed


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), "5", True])
def test_a_timeout_that_is_not_a_positive_number_is_bad_input(timeout):
    engine = Engine(FakeBackend())
    with pytest.raises(InvalidInputError, match="timeout must be"):
        engine.run(TokenizeJob("a"), timeout=timeout)
    assert engine.run(TokenizeJob("a"), timeout=None) == [97]
    engine.close()


def test_prompt_info_comes_back_with_the_reply():
    backend = FakeBackend("hi")
    engine = Engine(backend)
    text_prompt = Prompt(messages=({"role": "user", "content": f"<{TEXT_SLOT}>"},), text="abc")
    stream = reply(engine, prompt=text_prompt)
    pieces = list(stream)
    assert "".join(p.text for p in pieces) == "hi" and pieces[-1].finish_reason == "stop"
    assert stream.info.text == "abc" and not stream.info.truncated
    assert stream.info.prompt_tokens == len(backend.render_chat([{"role": "user", "content": "<abc>"}]))
    engine.close()


def test_a_text_is_cut_to_its_budget_and_the_output_says_so():
    backend = FakeBackend(label_logps={"a": -1.0})
    engine = Engine(backend)
    prompt = Prompt(messages=({"role": "user", "content": f"[{TEXT_SLOT}]"},), text="很长的文字" * 50,
                    max_text_tokens=20)
    out = engine.run(ScoreJob(prompt, ("a",)))
    assert out.info.truncated and "很长的文字".startswith(out.info.text[:5])
    assert len(backend.tokenize(out.info.text)) <= 20 and "\ufffd" not in out.info.text
    engine.close()


def test_a_batch_of_long_prompts_is_split_to_fit_the_kv_cache():
    class Pool:
        capacity_tokens = used_tokens = prompt_tokens = cached_tokens = 0

    Pool.capacity_tokens = 100
    backend = FakeBackend(label_logps={"a": -1.0})
    backend.kv = Pool()
    engine = Engine(backend, max_batch=8)
    # 30 tokens each, nothing in common: at most 50 (half the cache) per batch -> one each
    prompts = [Prompt(raw=c * 30) for c in "wxyz"]
    outs = [h.result() for h in engine.submit_all([ScoreJob(p, ("a",)) for p in prompts])]
    assert [o.logprobs for o in outs] == [(-1.0,)] * 4
    assert backend.batches == [1, 1, 1, 1]
    # 30 tokens each, 28 of them a shared task prefix: counted once, so they go together
    shared = [Prompt(raw="p" * 28 + c * 2) for c in "wxyz"]
    [h.result() for h in engine.submit_all([ScoreJob(p, ("a",)) for p in shared])]
    assert backend.batches[-1] == 4
    engine.close()

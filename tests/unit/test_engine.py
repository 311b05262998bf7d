"""The engine: one worker thread, a bounded fair queue, micro-batched scoring, continuous
batching of replies, cancellation, and errors that don't kill it."""

from __future__ import annotations

import threading
import time

import pytest

from allinone.backends.base import SamplingParams
from allinone.engine import Engine, Generation
from allinone.errors import InvalidInputError, OverloadedError, RequestTimeoutError
from fixtures.fakes import FakeBackend

GREEDY = SamplingParams(temperature=0, max_tokens=10_000)


def reply(engine: Engine, max_tokens: int = 10_000):
    return engine.generate(lambda b: Generation([1, 2], GREEDY.updated(max_tokens=max_tokens)))


def score(engine: Engine, text: str = "positive"):
    return engine.score(lambda b: (([1], [b.tokenize(text)]), text), lambda b, logps, ctx: (ctx, logps))


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
    assert engine.batch_sizes == {4: 1, 2: 1}
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
    assert backend.finished == 5  # every sequence was released
    engine.close()


def test_queue_bound_rejects_at_once():
    backend = FakeBackend()
    engine = Engine(backend, max_queue=2)
    backend.gate.clear()  # the worker blocks inside the first decode step
    first = reply(engine)
    consumer = threading.Thread(target=lambda: list(first))
    consumer.start()
    time.sleep(0.1)  # let the worker pick the first job up
    threads, results = in_threads([lambda: engine.call(lambda b: 1)] * 2)
    time.sleep(0.1)
    with pytest.raises(OverloadedError):
        engine.call(lambda b: 1)
    backend.gate.set()
    consumer.join()
    for t in threads:
        t.join()
    assert results == [1, 1]
    assert engine.call(lambda b: 42) == 42  # serving again once the queue drained
    assert engine.queue_depth == 0
    engine.close()


def test_jobs_run_in_arrival_order():
    engine = Engine(FakeBackend())
    order = []
    done = [threading.Event() for _ in range(5)]

    def job(i):
        order.append(i)
        return i

    for i in range(5):
        threading.Thread(target=lambda i=i: (engine.call(lambda b: job(i)), done[i].set())).start()
        time.sleep(0.02)
    for d in done:
        d.wait(5)
    assert order == sorted(order)
    engine.close()


def test_an_error_reaches_the_caller_and_the_worker_keeps_serving():
    engine = Engine(FakeBackend())

    def boom(b):
        raise InvalidInputError("bad")

    with pytest.raises(InvalidInputError):
        engine.call(boom)
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda b: 1 / 0)
    with pytest.raises(InvalidInputError):
        engine.score(boom, lambda b, logps, ctx: None)
    with pytest.raises(InvalidInputError):
        list(engine.generate(boom))
    assert engine.call(lambda b: "still here") == "still here"
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
    assert engine.call(lambda b: b.generated) < 1000  # the worker stopped early
    assert engine.call(lambda b: b.finished) == 1  # and released the sequence
    engine.close()


def test_timeout_is_reported():
    backend = FakeBackend()
    engine = Engine(backend, timeout=0.2)
    backend.gate.clear()
    with pytest.raises(RequestTimeoutError):
        list(reply(engine))
    backend.gate.set()
    assert engine.call(lambda b: 1, timeout=5) == 1
    engine.close()


def test_the_plan_comes_back_with_the_reply():
    engine = Engine(FakeBackend("hi"))
    stream = engine.generate(lambda b: Generation([1, 2, 3], GREEDY, info="mine"))
    pieces = list(stream)
    assert "".join(p.text for p in pieces) == "hi" and pieces[-1].finish_reason == "stop"
    assert stream.plan.info == "mine" and stream.plan.prompt_ids == [1, 2, 3]
    engine.close()


def test_a_batch_of_long_prompts_is_split_to_fit_the_kv_cache():
    class Pool:
        capacity_tokens = 100

    backend = FakeBackend(label_logps={"a": -1.0})
    backend.kv = Pool()
    engine = Engine(backend, max_batch=8)
    backend.gate.clear()
    blocker = reply(engine, max_tokens=1)
    consumer = threading.Thread(target=lambda: list(blocker))
    consumer.start()
    time.sleep(0.1)
    long_prompt = list(range(30))  # 30 tokens: at most 50 (half the cache) per batch -> one each
    threads, results = in_threads([
        lambda: engine.score(lambda b: ((long_prompt, [b.tokenize("a")]), None), lambda b, lp, ctx: lp)
    ] * 4)
    time.sleep(0.2)
    backend.gate.set()
    for t in threads:
        t.join()
    consumer.join()
    assert results == [[-1.0]] * 4
    assert backend.batches == [1, 1, 1, 1]
    engine.close()

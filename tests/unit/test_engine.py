"""The engine: one worker thread, bounded queue, cancellation, errors that don't kill it."""

from __future__ import annotations

import threading
import time

import pytest

from allinone.engine import Engine
from allinone.errors import InvalidInputError, OverloadedError, RequestTimeoutError
from fixtures.fakes import FakeBackend


def test_all_work_runs_on_one_worker_thread():
    backend = FakeBackend()
    engine = Engine(backend)
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.call(lambda b: b.score([1], [[1]])))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert backend.threads == {"allinone-engine"}
    engine.close()
    assert backend.closed


def test_queue_bound_rejects_at_once():
    backend = FakeBackend()
    engine = Engine(backend, max_queue=2)
    backend.gate.clear()  # the worker blocks inside the first stream
    first = engine.stream(lambda b: b.generate([1], None))
    started = threading.Event()
    consumer = threading.Thread(target=lambda: (started.set(), list(first)))
    consumer.start()
    started.wait()
    time.sleep(0.1)  # let the worker pick the first job up
    waiting = [engine.stream(lambda b: iter([1])) for _ in range(2)]
    with pytest.raises(OverloadedError):
        engine.call(lambda b: 1)
    backend.gate.set()
    consumer.join()
    assert [list(w) for w in waiting] == [[1], [1]]
    assert engine.call(lambda b: 42) == 42  # serving again once the queue drained
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
    assert engine.call(lambda b: "still here") == "still here"
    engine.close()


def test_closing_a_stream_cancels_generation():
    backend = FakeBackend("y" * 10_000, step_delay=0.001)
    engine = Engine(backend)
    stream = engine.stream(lambda b: b.generate([1], None))
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert engine.call(lambda b: b.generated) < 1000  # the worker stopped early
    engine.close()


def test_timeout_is_reported():
    backend = FakeBackend()
    engine = Engine(backend, timeout=0.2)
    backend.gate.clear()
    with pytest.raises(RequestTimeoutError):
        list(engine.stream(lambda b: b.generate([1], None)))
    backend.gate.set()
    assert engine.call(lambda b: 1, timeout=5) == 1
    engine.close()

"""Turns on one CPU for several engines.

Two engines (a task model and a chat model, the ``chat_model`` setting) that compute at the
same time each run all their threads on the same cores. Measured on 2 cores (docs/evaluation.md,
"A second model for chat"): sentiment p50 while a chat reply streams was 552 ms with both
computing at once and 434 ms with turns, for 8 % fewer chat tokens/s. Engines that share a
:class:`DeviceLock` take turns: one worker-loop turn (a micro-batch, a prompt's prefill, one
decode step) at a time, in the order they asked.
"""

from __future__ import annotations

import threading


class DeviceLock:
    """A first-come, first-served lock (a ticket lock).

    A plain ``threading.Lock`` lets the thread that releases it take it again at once, so one
    busy engine could starve the other; here a thread that asks again queues behind the ones
    already waiting. Use as a context manager.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> "DeviceLock":
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

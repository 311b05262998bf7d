"""Stopping the server (SIGTERM) while requests run: every client gets an answer, the model is
freed only after its worker stopped (real uvicorn on loopback, the server `allinone serve` runs)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import uvicorn

from allinone.server import app as server_app
from fixtures.fakes import FakeBackend
from fixtures.server import fake_app

CHAT = "/v1/chat/completions"
LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 2000, "temperature": 0}


def test_sigterm_during_long_requests_answers_each_with_a_503_and_stops(tmp_path, monkeypatch):
    """A fresh user's SIGTERM during a long request: the server crashed (exit 139) after 36 s and
    the client got no response; a stream was cut with no finish, no error and no [DONE]."""
    monkeypatch.setattr(server_app, "DRAIN_S", 0.5)
    backend = FakeBackend("y" * 10_000, end=False, step_delay=0.01)  # 2,000 tokens: 20 s
    app, backend, _ = fake_app(tmp_path, backend)
    state = app.state.server
    state.owns_ai = True  # as `allinone serve`, which loads the model itself
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = server_app.DrainingServer(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5), state)
    serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.02)

    answers: dict[str, object] = {}

    def plain() -> None:
        r = httpx.post(base + CHAT, json=LONG, timeout=30)
        answers["plain"] = (r.status_code, r.json(), time.monotonic())

    def streamed() -> None:
        with httpx.stream("POST", base + CHAT, json={**LONG, "stream": True}, timeout=30) as r:
            answers["stream_started"] = True
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        answers["stream"] = (lines[-1][len("data: "):], time.monotonic())

    clients = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for c in clients:
        c.start()
    while not answers.get("stream_started") or backend.generated < 20:
        time.sleep(0.02)
    stopped = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    for c in clients:
        c.join(timeout=15)
    serving.join(timeout=15)

    status, body, at = answers["plain"]
    assert status == 503 and body["error"]["code"] == "shutting_down", body
    assert at - stopped < 4  # the drain (0.5 s here), not the 20 s reply
    last, at = answers["stream"]
    assert json.loads(last)["error"]["code"] == "shutting_down" and at - stopped < 4
    assert not serving.is_alive() and backend.closed

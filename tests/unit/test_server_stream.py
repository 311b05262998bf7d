"""Server-sent event streams of /v1/chat/completions: chunk shapes, UTF-8, usage, errors inside
a stream, and generation stopping when the client goes away (real uvicorn on loopback)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from fixtures.fakes import FakeBackend
from fixtures.server import fake_app, live_server

CHAT = "/v1/chat/completions"
CJK_EMOJI = "你好，世界！😀👍🏽 今天天气很好 🇨🇳 done"


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    events = [e for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    payloads = []
    for event in events:
        lines = [line for line in event.split("\n") if not line.startswith(":")]  # ':' lines are pings
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), event
        payloads.append(lines[0][len("data: "):])
    return payloads


def stream_chunks(client, body: dict) -> tuple[list[dict], list[str]]:
    r = client.post(CHAT, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_data(r.text)
    return [json.loads(p) for p in payloads if p != "[DONE]"], payloads


@pytest.fixture
def cjk(tmp_path):
    app, backend, ai = fake_app(tmp_path, FakeBackend(CJK_EMOJI))
    with TestClient(app) as c:
        yield c
    ai.close()


def test_stream_of_chinese_and_emoji_parses_and_joins_to_the_plain_answer(cjk):
    body = {"messages": [{"role": "user", "content": "用中文回答 😀"}], "temperature": 0}
    chunks, payloads = stream_chunks(cjk, body)
    plain = cjk.post(CHAT, json=body).json()
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    assert len(chunks) > 5  # really streamed, not one blob
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == plain["choices"][0]["message"]["content"] == CJK_EMOJI
    assert all("\ufffd" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks)
    # OpenAI's chunk shape: same id throughout, role first, finish reason last
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-model" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert "usage" not in chunks[0]  # only with stream_options.include_usage


def test_include_usage_adds_a_final_usage_chunk(cjk):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
    chunks, _ = stream_chunks(cjk, body)
    plain = cjk.post(CHAT, json={"messages": body["messages"]}).json()
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(CJK_EMOJI.encode())


def test_stream_cut_by_max_tokens_ends_with_length(cjk):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    chunks, _ = stream_chunks(cjk, body)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == cjk.post(CHAT, json=body).json()["choices"][0]["message"]["content"] == "你好"  # 6 bytes


def test_errors_before_the_first_token_are_plain_http_errors(cjk):
    r = cjk.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = cjk.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


class FailingBackend(FakeBackend):
    """Says a few tokens, then the model fails."""

    def step(self, states):
        if self.generated >= 3:
            raise RuntimeError("the model fell over")
        return super().step(states)


def test_a_failure_inside_a_stream_is_an_error_event_and_not_fatal(tmp_path):
    app, _, ai = fake_app(tmp_path, FailingBackend("abcdef"))
    with TestClient(app) as c:
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        payloads = sse_data(r.text)
        assert "[DONE]" not in payloads
        last = json.loads(payloads[-1])
        assert last["error"]["type"] == "server_error" and "fell over" not in last["error"]["message"]
        assert "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1]) == "abc"
        assert c.get("/health").json()["in_flight"] == 0
        assert c.post("/v1/tasks/sentiment", json={"text": "still here"}).status_code == 200
    ai.close()


def test_a_timeout_inside_a_stream_is_an_error_event(tmp_path):
    app, _, ai = fake_app(tmp_path, FakeBackend("slow " * 50, step_delay=0.02), engine_timeout=0.3)
    with TestClient(app) as c:
        payloads = sse_data(c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stream": True}).text)
        assert json.loads(payloads[-1])["error"]["code"] == "timeout"
    ai.close()


# -- client disconnects (a real server: the test client cannot hang up mid-response) -------------
def settled(backend: FakeBackend, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """Wait until ``backend.generated`` stops growing; return it."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = backend.generated
        if now == last:
            return now
        last = now
        time.sleep(quiet)
    raise AssertionError("generation never stopped")


@pytest.fixture
def endless(tmp_path):
    """A live server whose model says 2000 tokens, 5 ms each (10 s in all)."""
    app, backend, ai = fake_app(tmp_path, FakeBackend("word " * 400, step_delay=0.005))
    with live_server(app) as url:
        yield url, backend
    ai.close()


def test_closing_a_stream_stops_generation(endless):
    url, backend = endless
    body = {"messages": [{"role": "user", "content": "talk"}], "stream": True, "max_tokens": 2000}
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break  # leaving the block hangs up mid-stream
        generated = settled(backend)
        assert generated < 200, generated  # of 2000: it stopped soon after the hang-up
        health = http.get("/health").json()
        assert health["in_flight"] == 0
        assert http.post("/v1/tasks/sentiment", json={"text": "next"}).status_code == 200


def test_a_plain_request_abandoned_by_its_client_stops_generation(endless):
    url, backend = endless
    body = {"messages": [{"role": "user", "content": "talk"}], "max_tokens": 2000}
    with httpx.Client(base_url=url) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(CHAT, json=body, timeout=0.5)
        generated = settled(backend)
        assert generated < 600, generated  # ~100 in the 0.5 s before the hang-up, of 2000
        assert http.get("/health").json()["in_flight"] == 0


class SlowPrefill(FakeBackend):
    """A model whose prompts take ``prefill_steps`` steps of 10 ms to compute (no token yet),
    as a long prompt computed slice by slice does."""

    prefill_steps = 1000  # 10 s

    def start(self, prompt_ids, sampling, **kw):
        state = super().start(prompt_ids, sampling, **kw)
        state.prefill_left = self.prefill_steps
        return state

    def step(self, states):
        self.steps.append(len(states))
        time.sleep(0.01)
        out = []
        for state in states:
            if state.prefill_left > 0:
                state.prefill_left -= 1
                out.append(None)
            else:
                out.extend(super().step([state]))
        return out


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_its_prompt_is_computed_stops_the_prompt(tmp_path, stream):
    """Before its first token a reply was not watched: a client gone during a long prompt left
    the server computing the rest of it (the wait for the first chunk held the stream's lock)."""
    app, backend, ai = fake_app(tmp_path, SlowPrefill())
    body = {"messages": [{"role": "user", "content": "a long document"}], "max_tokens": 8, "stream": stream}
    with live_server(app) as url, httpx.Client(base_url=url) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post(CHAT, json=body, timeout=0.5)
        deadline = time.monotonic() + 5
        while backend.finished == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.finished == 1  # the sequence was released: the job was dropped
        steps = len(backend.steps)
        time.sleep(0.3)
        assert len(backend.steps) == steps and steps < 300, steps  # no more steps; of 1,000
        assert http.get("/health").json()["in_flight"] == 0
    ai.close()

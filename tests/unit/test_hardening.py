"""What a hostile caller found (issue #12), each a test: bad input is a 4xx on every surface, a
long prompt does not block the server, cancellation stops it within a slice, and greedy output
does not depend on what else runs."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from allinone import AllInOne, InvalidInputError, Settings
from allinone.cli import app as cli
from allinone.engine import Engine, GenerateJob, Prompt
from allinone.types import SamplingParams
from fixtures.fakes import FakeBackend
from fixtures.server import fake_app

SURROGATE = "bad \ud800 text"
ROUTES = [  # (path, body with the text at "{}")
    ("/v1/tasks/sentiment", {"text": "{}"}),
    ("/v1/tokenize", {"text": "{}"}),
    ("/v1/tasks/chat", {"text": "{}"}),
    ("/v1/tasks/analyze", {"text": "{}"}),
    ("/v1/tasks/ner", {"text": "{}"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "{}"}]}),
]


def fill(body, value):
    return json.loads(json.dumps(body).replace('"{}"', json.dumps(value)))


@pytest.fixture
def client(tmp_path):
    app, backend, ai = fake_app(tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    ai.close()


@pytest.mark.parametrize("path,body", ROUTES)
def test_a_lone_surrogate_is_a_400_not_a_500(client, path, body):
    # the JSON escape "\ud800" decodes to a lone surrogate: what the fuzzer sent
    raw = json.dumps(fill(body, "bad @@ text")).replace("@@", "\\ud800")
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "surrogate" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/tasks/chat", "/v1/tasks/analyze"])
@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64, 2**70])
def test_an_out_of_range_seed_is_a_400(client, path, seed):
    body = {"messages": [{"role": "user", "content": "hi"}]} if "completions" in path else {"text": "hi"}
    r = client.post(path, json={**body, "seed": seed})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"


def test_bad_input_is_a_typed_error_in_python_and_one_line_exit_2_in_the_cli(tiny_hf_dir):
    ai = AllInOne(Engine(FakeBackend()), Settings())
    with pytest.raises(InvalidInputError, match="seed"):
        ai.chat("hi", seed=2**64)
    with pytest.raises(InvalidInputError, match="surrogate"):
        ai.sentiment(SURROGATE)
    with pytest.raises(InvalidInputError, match="surrogate"):
        ai.chat([{"role": "user", "content": "hi"}], system=SURROGATE)
    ai.close()
    out = CliRunner().invoke(cli, ["chat", "hi", "--seed", str(2**64), "--model", str(tiny_hf_dir), "--backend", "transformers"])
    assert out.exit_code == 2 and "seed" in out.output and "Traceback" not in out.output
    assert len([line for line in out.output.splitlines() if line.strip()]) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans()),
       top_p=st.one_of(st.floats(allow_nan=True), st.integers()), top_k=st.integers(-5, 10**12),
       max_tokens=st.integers(-5, 10**12), seed=st.one_of(st.none(), st.integers(-(2**70), 2**70)),
       stop=st.lists(st.text(max_size=5), max_size=6))
def test_sampling_params_accept_or_refuse_with_a_typed_error(temperature, top_p, top_k, max_tokens, seed, stop):
    try:
        p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                           stop=tuple(stop))
    except InvalidInputError as exc:
        assert exc.param in {"temperature", "top_p", "top_k", "max_tokens", "seed", "stop"}
        return
    assert 0 <= p.temperature <= 2 and 0 <= p.top_p <= 1 and p.max_tokens >= 1
    assert p.seed is None or 0 <= p.seed < 2**64


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40))
def test_any_text_is_classified_or_refused_with_a_typed_error(text):
    ai = _ai()
    try:
        result = ai.sentiment(text)
    except InvalidInputError:
        return
    assert set(result.scores) == {"positive", "negative"} and abs(sum(result.scores.values()) - 1) < 1e-9


_AI: list[AllInOne] = []


def _ai() -> AllInOne:
    if not _AI:
        _AI.append(AllInOne(Engine(FakeBackend(label_logps={"positive": -0.1})), Settings()))
    return _AI[0]


def test_a_long_prompt_does_not_block_a_short_request_and_stops_when_cancelled(tiny_llamacpp, monkeypatch):
    backend = tiny_llamacpp
    backend.kv.clear()
    monkeypatch.setattr(backend, "prefill_chunk", 32)
    slices: list[int] = []
    real = backend._forward

    def slow(entries, new_tokens, **kw):  # a slow CPU: 3 ms a token
        if not kw.get("logits", True):
            slices.append(len(new_tokens[0]))
        time.sleep(0.003 * sum(map(len, new_tokens)))
        return real(entries, new_tokens, **kw)

    monkeypatch.setattr(backend, "_forward", slow)
    ai = AllInOne(Engine(backend), Settings())  # not closed: the backend is session-wide
    try:
        ai.register_task({"name": "short", "kind": "classify", "instructions": {"en": "Good or bad?"},
                          "labels": [{"name": "good"}, {"name": "bad"}]})
        long_prompt = Prompt(messages=({"role": "user", "content": "many words here " * 110},))
        stream = ai._engine.submit(GenerateJob(long_prompt, SamplingParams(temperature=0, max_tokens=4)))
        consumer = threading.Thread(target=lambda: next(iter(stream), None), daemon=True)
        consumer.start()
        time.sleep(0.2)  # a few slices in
        t0 = time.monotonic()
        ai.run("short", "fine")
        waited = time.monotonic() - t0
        assert waited < 0.4, waited  # a slice or two (0.1 s each), not the rest of the prompt (~0.8 s)
        assert len(slices) < 10  # the long prompt was still being computed
        stream.cancel()  # the client goes away
        consumer.join(timeout=2)
        seen = sum(slices)
        time.sleep(0.4)
        assert sum(slices) <= seen + 32  # stopped within a slice
        assert slices and max(slices) <= 32
    finally:
        ai._engine.stop()  # the backend is session-wide

"""The HTTP service over a scripted fake model: every route, sessions, auth, CORS, metrics,
the queue bound, timeouts and failures that must not take the server down."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from allinone import AllInOne, Settings
from allinone.errors import ModelSourceError
from allinone.server import create_app
from allinone.server.security import key_matches
from allinone.tasks.chat import FEELING_OPENING
from fixtures.fakes import FakeBackend
from fixtures.server import REPLY, fake_app


@pytest.fixture
def client(tmp_path):
    app, _, ai = fake_app(tmp_path)
    with TestClient(app) as c:
        yield c
    ai.close()


def assert_error(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# -- task routes ------------------------------------------------------------------------------
def test_sentiment_route_gives_label_and_probabilities(client):
    body = client.post("/v1/tasks/sentiment", json={"text": "What a lovely day"}).json()
    assert body["object"] == "sentiment" and body["model"] == "fake-model"
    assert body["label"] == "positive"
    assert set(body["scores"]) == {"positive", "negative"}
    assert sum(body["scores"].values()) == pytest.approx(1.0)
    assert body["scores"]["positive"] > 0.9 and body["truncated"] is False


def test_sentiment_route_takes_the_tasks_parameters_as_the_python_api_does(client):
    body = client.post("/v1/tasks/sentiment", json={"text": "What a lovely day", "labels": ["good", "bad"]}).json()
    assert set(body["scores"]) == {"good", "bad"}
    assert client.post("/v1/tasks/sentiment", json={"text": "What a lovely day", "lang": "en", "calibrate": False}).status_code == 200
    assert_error(client.post("/v1/tasks/sentiment", json={"text": "hi", "calibrate": "yes"}), 400, param="calibrate")
    assert_error(client.post("/v1/tasks/sentiment", json={"text": "hi", "temperature": 0.5}), 400)


def test_analyze_runs_several_tasks_on_one_text_as_the_python_api_does(client):
    tasks = {"sentiment": {}, "intent": {"labels": ["PlayMusic", "GetWeather"]}}
    body = client.post("/v1/tasks/analyze", json={"text": "will it rain in Paris", "tasks": tasks}).json()
    assert body["object"] == "analysis" and list(body["results"]) == ["sentiment", "intent"]
    assert set(body["results"]["intent"]["scores"]) == {"PlayMusic", "GetWeather"}
    listed = client.post("/v1/tasks/analyze", json={"text": "will it rain in Paris", "tasks": ["sentiment"]}).json()
    assert listed["results"]["sentiment"] == body["results"]["sentiment"]
    assert_error(client.post("/v1/tasks/analyze", json={"text": "hi", "tasks": ["sentiment"], "session_id": "s1"}),
                 400, param="session_id")
    assert_error(client.post("/v1/tasks/analyze", json={"text": "hi", "tasks": []}), 400, param="tasks")
    assert_error(client.post("/v1/tasks/analyze", json={"text": "hi", "tasks": {"sentiment": {}, "intent": {"labels": 5}}}),
                 400, param="tasks.intent.labels")
    assert client.post("/v1/tasks/analyze", json={"text": "hi", "tasks": ["nosuch"]}).status_code == 404


def test_analyze_gives_sentiment_and_reply(client):
    body = client.post("/v1/tasks/analyze", json={"text": "I got the job!", "max_tokens": 64}).json()
    assert body["object"] == "analysis" and body["session_id"] is None
    assert body["sentiment"]["label"] == "positive"
    written = FEELING_OPENING["positive"]["en"]  # good news told: the reply meets it first
    assert body["reply"]["text"] == written + REPLY and body["reply"]["finish_reason"] == "stop"
    usage = body["reply"]["usage"]
    assert usage["completion_tokens"] == len((written + REPLY).encode())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_tokenize_route_counts_tokens(client):
    body = client.post("/v1/tokenize", json={"text": "héllo"}).json()
    assert body["tokens"] == list("héllo".encode()) and body["count"] == 6


# -- stored conversations ---------------------------------------------------------------------
def test_session_keeps_history_and_can_be_read_back_and_deleted(client):
    first = client.post("/v1/tasks/analyze", json={"text": "How are you?", "session_id": "conv-1"}).json()
    second = client.post("/v1/tasks/chat", json={"text": "and then?", "session_id": "conv-1"}).json()
    assert second["object"] == "chat.reply" and second["reply"]["text"] == REPLY
    assert first["reply"]["text"] == REPLY
    # the second prompt carries the stored first turn (compared with the same message sent alone:
    # analyze's prompt also has a mood line, so its length says nothing here)
    alone = client.post("/v1/tasks/chat", json={"text": "and then?"}).json()
    assert second["reply"]["usage"]["prompt_tokens"] > alone["reply"]["usage"]["prompt_tokens"] + len(REPLY)
    session = client.get("/v1/sessions/conv-1").json()
    assert [(m["role"], m["content"]) for m in session["messages"]] == [
        ("user", "How are you?"), ("assistant", REPLY), ("user", "and then?"), ("assistant", REPLY)]
    assert session["messages"][0]["sentiment"]["label"] == "positive"
    assert "sentiment" not in session["messages"][2]  # chat (not analyze) stores no sentiment
    deleted = client.delete("/v1/sessions/conv-1")
    assert deleted.json() == {"id": "conv-1", "object": "session.deleted", "deleted": True}
    assert_error(client.get("/v1/sessions/conv-1"), 404, "session_not_found")
    assert_error(client.delete("/v1/sessions/conv-1"), 404, "session_not_found")


def test_requests_without_session_store_nothing(client, tmp_path):
    client.post("/v1/tasks/chat", json={"text": "hello"})
    server = client.app.state.server
    assert server.store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_create_session_route(client):
    made = client.post("/v1/sessions")
    assert made.status_code == 201 and made.json()["messages"] == []
    named = client.post("/v1/sessions", json={"session_id": "named"}).json()
    assert named["id"] == "named"
    assert_error(client.post("/v1/sessions", json={"session_id": "named"}), 409, "session_exists", param="session_id")
    assert_error(client.post("/v1/sessions", json={"session_id": "bad id!"}), 400, param="session_id")
    for dots in (".", "..", ".x"):  # an HTTP client normalizes /v1/sessions/.. away: never readable
        assert_error(client.post("/v1/sessions", json={"session_id": dots}), 400, param="session_id")
    assert_error(client.get("/v1/sessions/bad%20id"), 400, param="session_id")


def test_history_survives_a_restart_of_the_server(tmp_path):
    app, _, ai = fake_app(tmp_path)
    with TestClient(app) as c:
        before = c.post("/v1/tasks/analyze", json={"text": "Do you remember me?", "session_id": "keep"}).json()
    ai.close()
    app2, _, ai2 = fake_app(tmp_path)  # same db_path, fresh app and model
    with TestClient(app2) as c:
        assert [m["content"] for m in c.get("/v1/sessions/keep").json()["messages"]] == ["Do you remember me?", REPLY]
        after = c.post("/v1/tasks/chat", json={"text": "Do you remember me?", "session_id": "keep"}).json()
        alone = c.post("/v1/tasks/chat", json={"text": "Do you remember me?"}).json()
    ai2.close()
    assert before["reply"]["text"] == REPLY
    assert after["reply"]["usage"]["prompt_tokens"] > alone["reply"]["usage"]["prompt_tokens"] + len(REPLY)


def test_a_failed_request_leaves_the_session_unchanged(client):
    client.post("/v1/tasks/chat", json={"text": "one", "session_id": "s"})
    assert_error(client.post("/v1/tasks/chat", json={"text": "two", "session_id": "s", "max_tokens": 0}), 400)
    assert len(client.get("/v1/sessions/s").json()["messages"]) == 2


# -- OpenAI-compatible ------------------------------------------------------------------------
def test_chat_completion_has_openai_shape(client):
    r = client.post("/v1/chat/completions", json={
        "model": "anything", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "seed": 1})
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-model" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == REPLY
    assert body["usage"]["completion_tokens"] == len(REPLY)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(REPLY)


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_under_either_name_gives_length(tmp_path, key):
    app, _, ai = fake_app(tmp_path, FakeBackend("abcdefgh"))
    with TestClient(app) as c:
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], key: 3}).json()
        assert body["choices"][0]["message"]["content"] == "abc"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        both = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4}
        assert_error(c.post("/v1/chat/completions", json=both), 400, param="max_tokens")
    ai.close()


def test_stop_strings_apply(tmp_path):
    app, _, ai = fake_app(tmp_path, FakeBackend("before STOP after"))
    with TestClient(app) as c:
        body = c.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}], "stop": "STOP"}).json()
    ai.close()
    assert body["choices"][0]["message"]["content"] == "before "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_models_route(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model"] and body["data"][0]["object"] == "model"
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"
    # the name the server was started with (the README's "embedded") finds the loaded model too
    assert client.get(f"/v1/models/{client.app.state.server.settings.model}").json()["id"] == "fake-model"
    assert_error(client.get("/v1/models/gpt-4"), 404)


def test_official_openai_client_plain_and_streamed(client):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    done = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert done.choices[0].message.content == REPLY and done.usage.completion_tokens == len(REPLY)
    chunks = list(api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage.completion_tokens == len(REPLY)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)


# -- health, loading, metrics -----------------------------------------------------------------
def test_health_is_503_while_loading_then_200(tmp_path, monkeypatch):
    release = threading.Event()
    fake = AllInOne.__new__(AllInOne)

    loaded = FakeBackend(REPLY)

    def slow_load(settings):
        release.wait(10)
        from allinone.engine import Engine

        AllInOne.__init__(fake, Engine(loaded), settings)
        return fake

    monkeypatch.setattr(AllInOne, "from_settings", classmethod(lambda cls, s: slow_load(s)))
    app = create_app(Settings(ui=False, db_path=tmp_path / "s.sqlite3"))
    with TestClient(app) as c:
        loading = c.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert loading.headers["retry-after"]
        assert_error(c.post("/v1/tasks/sentiment", json={"text": "hi"}), 503, "model_loading")
        assert c.get("/v1/sessions/x").status_code == 404  # sessions don't need the model
        release.set()
        wait_for(lambda: c.get("/health").status_code == 200)
        assert c.get("/health").json()["model"] == "fake-model"
        assert c.post("/v1/tasks/sentiment", json={"text": "hi"}).status_code == 200
    assert loaded.closed  # the app loaded it, so the app closed it


def test_a_failed_load_is_reported_not_fatal(tmp_path, monkeypatch):
    def broken(cls, settings):
        raise ModelSourceError("no such model")

    monkeypatch.setattr(AllInOne, "from_settings", classmethod(broken))
    with TestClient(create_app(Settings(ui=False, db_path=tmp_path / "s.sqlite3"))) as c:
        wait_for(lambda: c.get("/health").json()["status"] == "error")
        health = c.get("/health")
        assert health.status_code == 503 and "no such model" in health.json()["error"]["message"]
        assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503,
                     "model_load_failed")


def test_metrics_count_requests_tokens_and_queue(client):
    client.post("/v1/tasks/sentiment", json={"text": "good"})
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    client.post("/v1/tasks/sentiment", json={"text": ""})
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'allinone_requests_total{method="POST",route="/v1/tasks/sentiment",status="200"} 1.0' in text
    assert 'allinone_requests_total{method="POST",route="/v1/tasks/sentiment",status="400"} 1.0' in text
    assert f'allinone_completion_tokens_total{{route="/v1/chat/completions"}} {float(len(REPLY))}' in text
    assert 'allinone_request_duration_seconds_count{route="/v1/chat/completions"} 1.0' in text
    assert "allinone_queue_depth 0.0" in text and "allinone_model_loaded 1.0" in text


def test_each_app_has_its_own_metrics(tmp_path):
    app1, _, ai1 = fake_app(tmp_path / "a")
    app2, _, ai2 = fake_app(tmp_path / "b")
    with TestClient(app1) as c1, TestClient(app2) as c2:
        c1.post("/v1/tasks/sentiment", json={"text": "good"})
        line = 'allinone_requests_total{method="POST",route="/v1/tasks/sentiment",status="200"}'
        assert f"{line} 1.0" in c1.get("/metrics").text
        assert line not in c2.get("/metrics").text
    ai1.close()
    ai2.close()


# -- auth and CORS ----------------------------------------------------------------------------
def test_api_keys_guard_everything_but_health(tmp_path):
    app, _, ai = fake_app(tmp_path, api_keys=["k-one", "k-two"])
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        body = {"text": "hi"}
        missing = c.post("/v1/tasks/sentiment", json=body)
        assert_error(missing, 401, "invalid_api_key")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(c.post("/v1/tasks/sentiment", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.post("/v1/tasks/sentiment", json=body, headers={"Authorization": "Basic k-one"}), 401)
        assert_error(c.get("/metrics"), 401)
        assert_error(c.get("/v1/models"), 401)
        assert_error(c.get("/v1/sessions/x"), 401)
        for key in ("k-one", "k-two"):
            ok = c.post("/v1/tasks/sentiment", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        assert c.get("/metrics", headers={"Authorization": "Bearer k-two"}).status_code == 200
        assert c.head("/health").status_code == 200  # load balancers probe with HEAD too
    ai.close()


def test_key_check_compares_every_key_in_constant_time(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert key_matches("first", ["first", "second", "third"])
    assert len(calls) == 3  # no early exit on the first match
    assert not key_matches("firs", ["first"]) and not key_matches("", ["first"])


def test_cors_is_closed_by_default_and_opens_for_listed_origins(tmp_path):
    headers = {"Origin": "https://evil.example"}
    app, _, ai = fake_app(tmp_path)
    with TestClient(app) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers=headers).headers
    app2, _, ai2 = fake_app(tmp_path / "2", cors_origins=["https://ok.example"])
    with TestClient(app2) as c:
        ok = c.get("/health", headers={"Origin": "https://ok.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ok.example"
        assert "access-control-allow-origin" not in c.get("/health", headers=headers).headers
        preflight = c.options("/v1/chat/completions", headers={
            "Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
    ai.close()
    ai2.close()


# -- limits and failures ----------------------------------------------------------------------
def test_queue_limit_gives_503_with_retry_after_then_recovers(tmp_path):
    app, backend, ai = fake_app(tmp_path, max_queue=1)  # 1 running + 1 waiting
    backend.gate.clear()  # the first generation blocks inside the model
    results: list[int] = []
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as c:
        def send() -> None:
            results.append(c.post("/v1/chat/completions", json=chat).status_code)

        workers = [threading.Thread(target=send) for _ in range(2)]
        try:
            workers[0].start()
            wait_for(lambda: "generate" in backend.calls)  # the worker holds the first request
            workers[1].start()
            wait_for(lambda: c.app.state.server.admission.active == 2)
            busy = c.post("/v1/tasks/sentiment", json={"text": "hi"})
            assert_error(busy, 503, "overloaded")
            assert busy.headers["retry-after"] == "1"
            assert "allinone_requests_in_flight 2.0" in c.get("/metrics").text
        finally:
            backend.gate.set()  # never leave the worker blocked, even when an assertion failed
            for w in workers:
                w.join(10)
        assert results == [200, 200]
        assert c.post("/v1/tasks/sentiment", json={"text": "hi"}).status_code == 200
        assert c.app.state.server.admission.active == 0
    ai.close()


def test_timeout_gives_504_and_the_server_keeps_serving(tmp_path):
    app, backend, ai = fake_app(tmp_path, engine_timeout=0.3)
    backend.gate.clear()
    with TestClient(app) as c:
        try:
            assert_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}),
                         504, "timeout")
        finally:
            backend.gate.set()
        assert c.post("/v1/tasks/sentiment", json={"text": "hi"}).status_code == 200
        assert c.get("/health").json()["in_flight"] == 0
    ai.close()


def test_unexpected_failure_is_a_500_error_object_and_not_fatal(tmp_path, monkeypatch):
    app, backend, ai = fake_app(tmp_path)

    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(backend, "score_batch_hidden", boom)
        error = assert_error(c.post("/v1/tasks/sentiment", json={"text": "hi"}), 500, "internal_error")
        assert "kaboom" not in error["message"]  # internals are logged, not sent
        monkeypatch.undo()
        assert c.post("/v1/tasks/sentiment", json={"text": "hi"}).status_code == 200
        assert c.get("/health").status_code == 200
    ai.close()


def test_request_body_over_the_byte_limit_is_413(tmp_path):
    app, _, ai = fake_app(tmp_path, max_request_bytes=2048)
    with TestClient(app) as c:
        assert_error(c.post("/v1/tasks/sentiment", json={"text": "x" * 5000}), 413, "request_too_large")
        chunked = (part for part in [b'{"text": "', b"x" * 3000, b'"}'])  # no Content-Length: counted as read
        assert_error(c.post("/v1/tasks/sentiment", content=chunked, headers={"Content-Type": "application/json"}),
                     413, "request_too_large")
        assert c.post("/v1/tasks/sentiment", json={"text": "x" * 500}).status_code == 200
    ai.close()


def test_unknown_route_and_method_are_openai_errors(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_ui_is_mounted_at_ui(tmp_path):
    app, _, ai = fake_app(tmp_path, ui=True)
    with TestClient(app) as c:
        page = c.get("/ui/")
        assert page.status_code == 200 and "allinone chat" in page.text
        assert c.get("/", follow_redirects=False).headers["location"] == "/ui/"
    ai.close()

"""A second model for chat replies (the ``chat_model`` setting): replies come from it, tasks stay
on the task model, the two take turns on the CPU, and every surface names the right model."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from allinone import AllInOne, Settings
from allinone.api import resolve_chat_model
from allinone.engine import DeviceLock, Engine
from allinone.errors import ModelSourceError
from allinone.models import resolve_model
from allinone.server import create_app
from allinone.tasks.chat import FEELING_OPENING
from fixtures.fakes import FakeBackend
from fixtures.tiny_models import make_tiny_hf_model


class _Meter:
    """How many backends compute at once, at most."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def busy(self, seconds: float) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1


class _Metered(FakeBackend):
    def __init__(self, meter: _Meter, model_id: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.model_id = model_id

    def score_batch_hidden(self, requests, layers, **kw):
        self.meter.busy(0.003)
        return super().score_batch_hidden(requests, layers, **kw)

    def step(self, states):
        self.meter.busy(0.003)
        return super().step(states)


def _pair(device: DeviceLock | None = None, meter: _Meter | None = None):
    meter = meter or _Meter()
    tasks = _Metered(meter, "task-model", "task model's words", label_logps={"negative": -0.1, "positive": -3.0})
    chat = _Metered(meter, "chat-model", "chat model's words", label_logps={"positive": -0.1, "negative": -3.0})
    ai = AllInOne(Engine(tasks, device=device), Settings(), chat_engine=Engine(chat, device=device))
    return ai, tasks, chat, meter


def test_replies_come_from_the_chat_model_and_labels_from_the_task_model():
    ai, tasks, chat, _ = _pair()
    with ai:
        result = ai.analyze("Why was the soup so cold?", max_tokens=32, temperature=0)  # asks: no written opening
        assert result.sentiment.label == "negative"  # the task model's scores
        assert result.reply.text == "chat model's words"
        assert ai.chat("hello", max_tokens=32).text == "chat model's words"
        assert "generate" not in tasks.calls and "score" not in chat.calls
        assert ai.model_id == "task-model" and ai.chat_model_id == "chat-model"
    assert tasks.closed and chat.closed


def test_stats_add_both_engines():
    ai, _, chat, _ = _pair()
    with ai:
        chat.gate.clear()  # the first reply holds the chat engine's worker in a decode step
        first = ai.chat("hello", stream=True, max_tokens=32)
        deadline = time.monotonic() + 5
        while not chat.steps and time.monotonic() < deadline:
            time.sleep(0.01)
        second = ai.chat("hello again", stream=True, max_tokens=32)
        assert ai.stats().queue_depth == 1  # waiting on the chat engine, counted
        chat.gate.set()
        assert "".join(c.text for c in first) == "".join(c.text for c in second) == "chat model's words"


def _race(ai: AllInOne) -> None:
    def talk() -> None:
        ai.chat("hello", max_tokens=60, temperature=0)

    def label() -> None:
        for _ in range(20):
            ai.sentiment("cold soup")

    threads = [threading.Thread(target=f) for f in (talk, talk, label, label)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_two_engines_sharing_a_device_never_compute_at_once():
    ai, _, _, meter = _pair(DeviceLock())
    with ai:
        _race(ai)
    assert meter.most == 1
    # the same race without a shared device overlaps: the check above can fail
    ai, _, _, meter = _pair(None)
    with ai:
        _race(ai)
    assert meter.most == 2


def test_the_device_lock_serves_in_the_order_asked():
    lock = DeviceLock()
    order: list[str] = []
    waiting = threading.Event()

    def other() -> None:
        waiting.set()
        with lock:
            order.append("other")

    with lock:
        t = threading.Thread(target=other)
        t.start()
        waiting.wait(5)
        time.sleep(0.05)  # `other` now holds a ticket
    with lock:  # asked again at once: behind `other`
        order.append("again")
    t.join(5)
    assert order == ["other", "again"]


# -- which model -------------------------------------------------------------------------------
def test_no_chat_model_means_one_model(tiny_gguf_path):
    main = resolve_model(str(tiny_gguf_path))
    assert resolve_chat_model(Settings(), main) is None
    assert resolve_chat_model(Settings(chat_model=str(tiny_gguf_path)), main) is None  # the same file


def test_auto_without_the_larger_model_installed_keeps_one_model(tiny_gguf_path, monkeypatch, caplog):
    def missing(name, **kw):
        raise ModelSourceError(f"{name}: none of its packages is installed\npip install ...")

    monkeypatch.setattr("allinone.api.resolve_model", missing)
    with caplog.at_level("INFO", logger="allinone.api"):
        assert resolve_chat_model(Settings(chat_model="auto"), resolve_model(str(tiny_gguf_path))) is None
    assert "embedded-1.5b is not available" in caplog.text


def test_auto_takes_the_larger_model_when_installed(tiny_gguf_path, tmp_path, monkeypatch):
    other = tmp_path / "bigger.gguf"
    shutil.copy(tiny_gguf_path, other)
    asked = []

    def installed(name, **kw):
        asked.append(name)
        return resolve_model(str(other))

    monkeypatch.setattr("allinone.api.resolve_model", installed)
    chat = resolve_chat_model(Settings(chat_model="auto"), resolve_model(str(tiny_gguf_path)))
    assert asked == ["embedded-1.5b"] and chat is not None and chat.path == other


def test_a_named_chat_model_that_is_missing_is_an_error(tiny_gguf_path, tmp_path):
    with pytest.raises(ModelSourceError):
        AllInOne.load(str(tiny_gguf_path), chat_model=str(tmp_path / "no-such-model.gguf"), cache_dir=tmp_path)


def test_loaded_from_settings_each_model_answers_as_it_does_alone(tiny_gguf_path, tmp_path):
    """Two different tiny models: replies equal those of the chat model alone, labels those of
    the task model alone."""
    chat_dir = make_tiny_hf_model(tmp_path / "chat-model", seed=1)
    options = {"n_ctx": 1024, "cache_dir": tmp_path / "cache"}
    message = [{"role": "user", "content": "Tell me about the sea."}]
    with AllInOne.load(str(tiny_gguf_path), **options) as alone:
        labels = alone.sentiment("The soup was cold.").scores
        task_model_reply = alone.chat(message, max_tokens=12, temperature=0).text
    with AllInOne.load(str(chat_dir), **options) as alone:
        reply = alone.chat(message, max_tokens=12, temperature=0).text
    assert reply != task_model_reply  # else the check below could not tell the models apart
    with AllInOne.load(str(tiny_gguf_path), chat_model=str(chat_dir), **options) as both:
        assert both.chat(message, max_tokens=12, temperature=0).text == reply
        assert both.sentiment("The soup was cold.").scores == pytest.approx(labels, abs=1e-6)
        assert both.chat_info.backend == "transformers" and both.info.backend == "llamacpp"


# -- surfaces ----------------------------------------------------------------------------------
def test_the_http_service_names_the_chat_model_where_it_answers(tmp_path):
    ai, _, _, _ = _pair()
    config = Settings(ui=False, db_path=tmp_path / "sessions.sqlite3")
    with TestClient(create_app(config, ai=ai)) as c:
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["task-model", "chat-model"]
        assert c.get("/v1/models/chat-model").json()["id"] == "chat-model"
        assert c.get("/v1/models/other").status_code == 404
        body = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert body["model"] == "chat-model"
        assert body["choices"][0]["message"]["content"] == "chat model's words"
        health = c.get("/health").json()
        assert health["model"] == "task-model" and health["chat_model"] == "chat-model"
        sentiment = c.post("/v1/tasks/sentiment", json={"text": "cold soup"}).json()
        assert sentiment["model"] == "task-model" and sentiment["label"] == "negative"
    ai.close()


def test_the_chat_task_run_as_a_task_is_answered_by_the_chat_model():
    ai, tasks, chat, _ = _pair()
    with ai:
        assert ai.run("chat", "hello", max_tokens=32).text == "chat model's words"
        assert [r.text for r in ai.run_many("chat", ["hi", "hello"], max_tokens=32)] == ["chat model's words"] * 2
        both = ai.analyze("The soup was cold.", tasks=["sentiment", "chat"], max_tokens=96).results
        # a complaint told: the task model scores it, the chat model writes after the written words
        assert both["sentiment"].label == "negative"
        written = FEELING_OPENING["negative"]["en"]
        rest = both["chat"].text.removeprefix(written)
        assert both["chat"].text.startswith(written) and rest and "chat model's words".startswith(rest)
        assert "generate" not in tasks.calls and "score" not in chat.calls


def test_analyze_asked_for_sentiment_and_chat_scores_the_text_once():
    ai, tasks, _, _ = _pair()
    with ai:
        both = ai.analyze("The soup was cold.", tasks=["sentiment", "chat"], max_tokens=96).results
        # the reply is told the sentiment the caller asked for: one forward pass, not two
        assert tasks.calls.count("score") == 1
        assert both["chat"].text.startswith(FEELING_OPENING["negative"]["en"])
        # the demo without tasks gives the same reply
        alone = ai.analyze("The soup was cold.", max_tokens=96)
        assert alone.reply.text == both["chat"].text and alone.sentiment.label == both["sentiment"].label
        # a sentiment asked for with its own parameters is its own run: the reply scores its own
        ai.analyze("The soup was cold.", tasks={"sentiment": {"lang": "en"}, "chat": {}}, max_tokens=96)
        assert tasks.calls.count("score") == 4

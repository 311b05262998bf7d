"""The web UI's handlers without a browser: badges, streaming, per-session history, errors;
and the UI's log-in when API keys are set."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from allinone import AllInOne, Settings
from allinone.engine import Engine
from allinone.results import ClassifyResult
from allinone.server.errors import ModelLoadingError
from fixtures.fakes import FakeBackend
from fixtures.server import fake_app

gr = pytest.importorskip("gradio")
from allinone.ui import ChatHandlers, sentiment_badge  # noqa: E402


class SpyAI(AllInOne):
    """Records the conversations sent to chat()."""

    def __init__(self, backend: FakeBackend) -> None:
        super().__init__(Engine(backend), Settings(ui=False))
        self.sent: list[list[dict]] = []

    def chat(self, messages, **kwargs):
        self.sent.append(list(messages))
        return super().chat(messages, **kwargs)


@pytest.fixture
def spy():
    ai = SpyAI(FakeBackend("好的 👍 sure", label_logps={"negative": -0.2, "positive": -2.0}))
    yield ai
    ai.close()


def test_badge_has_emoji_label_and_probability():
    assert sentiment_badge(ClassifyResult("positive", {"positive": 0.968, "negative": 0.032})) == "😊 positive (97%)"
    assert sentiment_badge(ClassifyResult("negative", {"positive": 0.2, "negative": 0.8})) == "😞 negative (80%)"


def test_respond_shows_the_badge_first_then_streams_the_reply(spy):
    steps = list(ChatHandlers(lambda: spy).respond("这太糟糕了", [], [], 0.0, 64))
    box, shown, history, scores = steps[0]
    assert box == "" and shown[0]["role"] == "user"
    assert shown[0]["content"] == "这太糟糕了\n\n*😞 negative (86%)*"
    assert shown[1] == {"role": "assistant", "content": ""} and history == []
    assert scores["negative"] == pytest.approx(0.858, abs=0.01)
    replies = [step[1][-1]["content"] for step in steps[1:]]
    assert replies[-1] == "好的 👍 sure" and len(set(replies)) > 3  # it grew chunk by chunk
    assert steps[-1][2] == [{"role": "user", "content": "这太糟糕了"}, {"role": "assistant", "content": "好的 👍 sure"}]


def test_history_carries_over_without_badges(spy):
    handlers = ChatHandlers(lambda: spy)
    *_, (_, shown, history, _) = handlers.respond("first", [], [], 0.0, 64)
    list(handlers.respond("second", shown, history, 0.0, 64))
    assert spy.sent[-1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "好的 👍 sure"},
                            {"role": "user", "content": "second"}]
    assert handlers.reset() == ([], [], None, "")


def test_errors_become_toasts(spy):
    def loading():
        raise ModelLoadingError()

    with pytest.raises(gr.Error, match="loading"):
        list(ChatHandlers(loading).respond("hi", [], [], 0.7, 64))
    with pytest.raises(gr.Error, match="Type a message"):
        list(ChatHandlers(lambda: spy).respond("   ", [], [], 0.7, 64))
    with pytest.raises(gr.Error, match="limit"):
        list(ChatHandlers(lambda: spy).respond("x" * 200_000, [], [], 0.7, 64))


def test_ui_needs_a_log_in_when_api_keys_are_set(tmp_path):
    app, _, ai = fake_app(tmp_path, ui=True, api_keys=["secret-key"])
    with TestClient(app) as c:
        assert c.get("/ui/config").status_code == 401
        assert c.post("/ui/login/", data={"username": "me", "password": "wrong"}).status_code == 400
        assert c.post("/ui/login/", data={"username": "me", "password": "secret-key"}).status_code == 200
        assert c.get("/ui/config").status_code == 200  # the log-in cookie now opens it
    ai.close()

"""The web UI's handlers without a browser: badges, streaming, per-session history, errors;
and the UI's log-in when API keys are set."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from allinone import AllInOne, Settings
from allinone.engine import Engine
from allinone.errors import ModelLoadingError
from allinone.results import ClassifyResult
from allinone.tasks.chat import FEELING_OPENING
from fixtures.fakes import FakeBackend
from fixtures.server import fake_app

gr = pytest.importorskip("gradio")
from allinone.ui import ChatHandlers, sentiment_badge  # noqa: E402


class SpyAI(AllInOne):
    """Records the conversations sent to the model (the history before the new message, then it)."""

    def __init__(self, backend: FakeBackend) -> None:
        super().__init__(Engine(backend), Settings(ui=False))
        self.sent: list[list[dict]] = []

    def analyze_stream(self, text, history=None, **kwargs):
        self.sent.append([*(history or []), {"role": "user", "content": text}])
        return super().analyze_stream(text, history, **kwargs)


@pytest.fixture
def spy():
    ai = SpyAI(FakeBackend("好的 👍 sure", label_logps={"negative": -0.2, "positive": -2.0}))
    yield ai
    ai.close()


def test_badge_has_emoji_label_and_probability():
    assert sentiment_badge(ClassifyResult("positive", {"positive": 0.968, "negative": 0.032})) == "😊 positive (97%)"
    assert sentiment_badge(ClassifyResult("negative", {"positive": 0.2, "negative": 0.8})) == "😞 negative (80%)"


def test_respond_shows_the_badge_first_then_streams_the_reply(spy):
    steps = list(ChatHandlers(lambda: spy).respond("这太糟糕了", [], 0.0, 64))
    box, shown, scores = steps[0]
    assert box == "" and shown[0]["role"] == "user"
    assert shown[0]["content"] == "这太糟糕了\n\n*😞 negative (86%)*"
    assert shown[1] == {"role": "assistant", "content": ""}
    assert scores["negative"] == pytest.approx(0.858, abs=0.01)
    replies = [step[1][-1]["content"] for step in steps[1:]]
    # a complaint told: the reply meets it in its first words, then the model's own
    assert replies[-1] == FEELING_OPENING["negative"]["zh"] + "好的 👍 sure" and len(set(replies)) > 3  # it grew
    assert spy.sent[-1] == [{"role": "user", "content": "这太糟糕了"}]


def test_the_model_sees_what_the_page_shows(spy):
    handlers = ChatHandlers(lambda: spy)
    *_, (_, shown, _) = handlers.respond("first", [], 0.0, 64)
    list(handlers.respond("second", shown, 0.0, 64))
    assert shown[-1]["content"].endswith("好的 👍 sure")
    assert spy.sent[-1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": shown[-1]["content"]},
                            {"role": "user", "content": "second"}]
    # the page was cleared (or the browser sent nothing): the model sees nothing before the message
    list(handlers.respond("third", [], 0.0, 64))
    assert spy.sent[-1] == [{"role": "user", "content": "third"}]
    # an edited page is what the model sees, badges off, the user's own asterisks kept
    edited = [{"role": "user", "content": "*my* words\n\n*😊 positive (90%)*"}, {"role": "assistant", "content": "ok"}]
    list(handlers.respond("fourth", edited, 0.0, 64))
    assert spy.sent[-1][0] == {"role": "user", "content": "*my* words"}
    assert handlers.reset() == ([], None, "")


def test_errors_become_toasts(spy):
    def loading():
        raise ModelLoadingError()

    with pytest.raises(gr.Error, match="loading"):
        list(ChatHandlers(loading).respond("hi", [], 0.7, 64))
    with pytest.raises(gr.Error, match="Type a message"):
        list(ChatHandlers(lambda: spy).respond("   ", [], 0.7, 64))
    with pytest.raises(gr.Error, match="limit"):
        list(ChatHandlers(lambda: spy).respond("x" * 200_000, [], 0.7, 64))


# every door of the app with keys set: (method, path) -> must refuse without a key
DOORS = [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/ui/"), ("GET", "/ui/config"),
         ("POST", "/ui/gradio_api/cancel"), ("POST", "/ui/gradio_api/reset"), ("POST", "/ui/gradio_api/queue/join"),
         ("GET", "/ui/gradio_api/queue/data?session_hash=x"), ("POST", "/ui/gradio_api/upload"), ("GET", "/ui/info"),
         ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/tasks"), ("POST", "/v1/tasks/sentiment"),
         ("POST", "/v1/chat/completions"), ("GET", "/v1/sessions/x"), ("POST", "/v1/tokenize"), ("GET", "/"),
         ("GET", "/no/such/route")]


@pytest.mark.parametrize("method,path", DOORS)
def test_every_door_needs_the_key_when_keys_are_set(tmp_path, method, path):
    app, _, ai = fake_app(tmp_path, ui=True, api_keys=["secret-key"])
    with TestClient(app, follow_redirects=False) as c:
        refused = c.request(method, path, json={} if method == "POST" else None)
        assert refused.status_code == 401, (path, refused.status_code, refused.text[:200])
        assert refused.json()["error"]["code"] == "invalid_api_key"
        # (queue/data: an SSE stream of an unknown session, nothing more to see there)
        for scheme in ("Bearer", "bearer", "BEARER") if "queue/data" not in path else ():
            # RFC 7235: the scheme is case-insensitive
            allowed = c.request(method, path, json={} if method == "POST" else None,
                                headers={"Authorization": f"{scheme} secret-key"})
            assert allowed.status_code != 401, (path, scheme)
        wrong = c.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    ai.close()


def test_browsers_log_in_with_a_key_and_the_ui_then_works(tmp_path):
    app, _, ai = fake_app(tmp_path, ui=True, api_keys=["secret-key"])
    with TestClient(app, follow_redirects=False) as c:
        page = c.get("/ui/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/ui/"
        assert "API key" in c.get("/login").text
        bad = c.post("/login", data={"key": "wrong", "next": "/ui/"})
        assert bad.status_code == 401 and "not valid" in bad.text
        assert c.get("/ui/config").status_code == 401
        good = c.post("/login", data={"key": "secret-key", "next": "https://evil.example/"})
        assert good.status_code == 303 and good.headers["location"] == "/"  # never off this server
        assert c.get("/ui/config").status_code == 200  # the session cookie now opens the UI
        assert c.get("/docs").status_code == 200
        assert c.get("/health").status_code == 200
    ai.close()


def test_metrics_can_be_opened_by_a_setting(tmp_path):
    app, _, ai = fake_app(tmp_path, api_keys=["k"], metrics_public=True)
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models").status_code == 401
    ai.close()


# -- the Tasks tab ---------------------------------------------------------------------------
from allinone.ui.tasks_tab import (  # noqa: E402
    TaskHandlers,
    data_markdown,
    parse_names,
    span_table,
    span_tokens,
    task_choices,
)

NER_REPLY = '{"entities":[{"text":"Angela Merkel","type":"PER"},{"text":"Paris","type":"LOC"},{"text":"Rome","type":"LOC"}]}'
NER_TEXT = "Angela Merkel met Emmanuel Macron in Paris."
OUTPUTS = TaskHandlers.OUTPUTS


def make_ai(reply: str = "ok", **label_logps: float) -> AllInOne:
    ai = AllInOne(Engine(FakeBackend(reply, label_logps=label_logps)), Settings(ui=False))
    ai.fake = ai._engine._backend  # the test's view of what the model was asked
    return ai


def shown(update: tuple) -> dict[str, object]:
    """name -> value of the outputs a run made visible (the JSON is always set)."""
    out = dict(zip(OUTPUTS, update))
    return {k: (v if k == "notes" else v.get("value")) for k, v in out.items()
            if k in ("json", "notes") or (k != "json_box" and v.get("visible"))}


@pytest.fixture
def ner_ai():
    ai = make_ai(NER_REPLY, positive=-0.1, negative=-2.5)
    yield ai
    ai.close()


def test_the_selector_lists_every_task_with_its_description(ner_ai):
    ner_ai.register_task({"name": "urgency", "kind": "classify", "description": "Is a ticket urgent?",
                          "instructions": {"en": "Urgent or normal? {labels}"},
                          "labels": [{"name": "urgent"}, {"name": "normal"}]})
    choices = task_choices(ner_ai)
    assert [name for _, name in choices] == ner_ai.tasks.names()
    assert ("urgency — Is a ticket urgent?", "urgency") in choices
    dropdown, timer, _ = TaskHandlers(lambda: ner_ai).refresh()
    assert dropdown["choices"] == choices and dropdown["value"] == "sentiment" and timer["active"] is False
    assert TaskHandlers(lambda: ner_ai).refresh("ner")[0]["value"] == "ner"  # the current pick is kept


def test_while_the_model_loads_the_list_is_empty_and_asked_for_again():
    def loading():
        raise ModelLoadingError()

    dropdown, timer, info = TaskHandlers(loading).refresh()
    assert dropdown["choices"] == [] and dropdown["value"] is None
    assert timer["active"] is True and "loading" in info


def test_picking_a_task_shows_the_parameters_it_takes(ner_ai):
    names = ("info", "labels", "types", "lang", "calibrate", "max_tokens", "temperature", "example")
    handlers = TaskHandlers(lambda: ner_ai)

    def controls(task):
        update = handlers.select(task)
        assert len(update) == len(names) + len(OUTPUTS)
        return dict(zip(names, update))

    intent = controls("intent")
    assert "intent" in intent["info"] and "classify" in intent["info"]
    assert intent["labels"]["visible"] and "required" in intent["labels"]["label"]
    assert not intent["types"]["visible"] and not intent["max_tokens"]["visible"] and not intent["example"]["visible"]
    sentiment3 = controls("sentiment3")
    assert sentiment3["labels"]["placeholder"] == "positive, neutral, negative"
    declared = ner_ai.tasks.get("sentiment3").defaults.calibrate  # the box starts at the task's default
    assert sentiment3["calibrate"] == {"__type__": "update", "visible": True, "value": declared}
    ner = controls("ner")
    assert ner["types"]["visible"] and ner["types"]["placeholder"] == "PER, ORG, LOC, MISC"
    assert not ner["labels"]["visible"] and not ner["calibrate"]["visible"]
    assert ner["max_tokens"]["value"] == 320 and ner["lang"]["choices"] == ["auto", "en", "zh"]
    assert ner["example"]["visible"]
    chat = controls("chat")
    declared = ner_ai.tasks.get("chat").defaults
    assert chat["max_tokens"]["value"] == declared.max_tokens and chat["temperature"]["value"] == declared.temperature
    assert all(not u["visible"] for u in handlers.select(None)[1:8])
    assert "unknown task" in controls("nope")["info"]


def test_example_text_comes_from_the_task_declaration(ner_ai):
    handlers = TaskHandlers(lambda: ner_ai)
    assert handlers.example("ner", "auto").startswith("Maria Lopez")
    assert handlers.example("ner", "zh") == "王建国昨天代表青禾科技在杭州签下了一份合同。"
    with pytest.raises(gr.Error, match="no example"):
        handlers.example("intent", "auto")


def test_classify_shows_the_label_probabilities_the_api_gives(ner_ai):
    (update,) = TaskHandlers(lambda: ner_ai).run("sentiment", "What a lovely day", "", "", "auto", False, 256, 0.0)
    out = shown(update)
    expected = ner_ai.run("sentiment", "What a lovely day")
    assert set(out) == {"label", "json", "notes"}
    assert out["label"] == expected.scores and out["json"] == expected.to_dict()
    assert dict(zip(OUTPUTS, update))["json_box"]["open"] is False


def test_labels_per_request_comma_separated_or_with_descriptions():
    ai = make_ai(BookFlight=-0.2, PlayMusic=-2.0)
    handlers = TaskHandlers(lambda: ai)
    (update,) = handlers.run("intent", "fly me to Rome", "BookFlight, PlayMusic", None, "auto", False)
    assert shown(update)["label"] == ai.run("intent", "fly me to Rome", labels=["BookFlight", "PlayMusic"]).scores
    (update,) = handlers.run("intent", "fly me to Rome", "BookFlight: book a flight\nPlayMusic: play a song")
    assert shown(update)["json"]["label"] == "BookFlight"
    with pytest.raises(gr.Error, match="needs labels"):
        list(handlers.run("intent", "fly me to Rome", "  "))
    with pytest.raises(gr.Error, match="at least two"):
        list(handlers.run("intent", "fly me to Rome", "BookFlight"))
    ai.close()


def test_ner_shows_highlighted_spans_and_a_table(ner_ai):
    (update,) = TaskHandlers(lambda: ner_ai).run("ner", NER_TEXT, None, "", "auto", None, 320, 0.0)
    out = shown(update)
    expected = ner_ai.run("ner", NER_TEXT)
    assert set(out) == {"spans", "table", "json", "notes"}
    assert out["spans"] == [("Angela Merkel", "PER"), (" met Emmanuel Macron in ", None), ("Paris", "LOC"), (".", None)]
    assert out["table"]["data"] == [[e["text"], e["type"], e["start"], e["end"]] for e in expected.data["entities"]]
    assert out["json"] == expected.to_dict() and "1 span(s) not found" in out["notes"]


def test_span_types_per_request_narrow_the_schema(ner_ai):
    list(TaskHandlers(lambda: ner_ai).run("ner", NER_TEXT, None, "PER", "auto", None, 320, 0.0))
    enum = ner_ai.fake.schemas[-1]["properties"]["entities"]["items"]["properties"]["type"]["enum"]
    assert enum == ["PER"]


def test_keywords_are_a_list_and_other_shapes_fall_back_to_json():
    ai = make_ai('{"keywords": ["solar pumps", "irrigation", "*farms*"]}')
    (update,) = TaskHandlers(lambda: ai).run("keywords", "Solar pumps for irrigation on farms.")
    out = shown(update)
    assert set(out) == {"markdown", "json", "notes"}
    assert out["markdown"] == "**keywords** (3)\n1. solar pumps\n2. irrigation\n3. \\*farms\\*"
    ai.close()
    ai = make_ai('{"people": [{"name": "Ann", "age": 3}]}')
    ai.register_task({"name": "people", "kind": "extract", "instructions": {"en": "People. JSON."},
                      "output_schema": {"type": "object", "required": ["people"], "properties": {"people": {
                          "type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                              "name": {"type": "string"}, "age": {"type": "integer"}}}}}}})
    (update,) = TaskHandlers(lambda: ai).run("people", "Ann is three.")
    assert set(shown(update)) == {"json", "notes"}
    assert shown(update)["json"]["data"] == {"people": [{"name": "Ann", "age": 3}]}
    assert dict(zip(OUTPUTS, update))["json_box"] == {"__type__": "update", "visible": True, "open": True}
    ai.close()


def test_a_generate_task_streams_its_text(spy):
    steps = list(TaskHandlers(lambda: spy).run("chat", "hello", None, None, "auto", None, 64, 0.0))
    texts = [shown(step)["markdown"] for step in steps]
    assert texts[-1] == "好的 👍 sure" and len(set(texts)) > 3
    final = shown(steps[-1])["json"]
    assert final["text"] == "好的 👍 sure" and final["finish_reason"] == "stop"


def test_task_errors_become_toasts(ner_ai):
    def loading():
        raise ModelLoadingError()

    handlers = TaskHandlers(lambda: ner_ai)
    with pytest.raises(gr.Error, match="Pick a task"):
        list(handlers.run(None, "hi"))
    with pytest.raises(gr.Error, match="Type or paste"):
        list(handlers.run("ner", "  \n "))
    with pytest.raises(gr.Error, match="limit"):
        list(handlers.run("ner", "x" * 200_000))
    with pytest.raises(gr.Error, match="unknown task"):
        list(handlers.run("nope", "hi"))
    with pytest.raises(gr.Error, match="loading"):
        list(TaskHandlers(loading).run("ner", "hi"))
    with pytest.raises(gr.Error, match="duplicates"):
        list(handlers.run("sentiment", "hi", "good, good"))


def test_parse_names():
    assert parse_names("") is None and parse_names(" , ") is None and parse_names(None) is None
    assert parse_names("a, b ,c") == ["a", "b", "c"]
    assert parse_names("a: first one, really\nb") == {"a": "first one, really", "b": ""}
    assert parse_names("a\na") == ["a", "a"]


def test_span_views_keep_every_character():
    text = "王建国在杭州。Ann!"
    spans = [{"text": "杭州", "type": "LOC", "start": 4, "end": 6},
             {"text": "王建国", "type": "PER", "start": 0, "end": 3},
             {"text": "bad", "type": "X", "start": 5, "end": 9}]
    tokens = span_tokens(text, spans)
    assert "".join(t for t, _ in tokens) == text
    assert tokens == [("王建国", "PER"), ("在", None), ("杭州", "LOC"), ("。Ann!", None)]
    assert span_tokens("no names", []) == [("no names", None)]
    assert span_table(spans[:1])["data"] == [["杭州", "LOC", 4, 6]]
    assert data_markdown({"n": 3, "ok": True, "tags": []}) == "**n**: 3\n\n**ok**: true\n\n**tags** (0)\n*none*"
    assert data_markdown({"x": {"y": 1}}) is None


def test_the_page_has_both_tabs(tmp_path):
    app, _, ai = fake_app(tmp_path, ui=True)
    with TestClient(app) as c:
        config = c.get("/ui/config").json()
    ids = {comp.get("props", {}).get("elem_id") for comp in config["components"]}
    assert {"chat-tab", "chat", "message", "send", "tasks-tab", "task", "task-text", "task-run",
            "task-label", "task-spans", "task-json"} <= ids
    ai.close()


def test_the_tasks_tab_shows_a_label_coverage_warning():
    ai = make_ai(positive=-9.0, negative=-9.5)  # labels the model would hardly say
    (update,) = TaskHandlers(lambda: ai).run("sentiment", "The soup was cold.")
    notes = shown(update)["notes"]
    assert "label coverage 0.00" in notes and "may not fit" in notes
    ai.close()

"""Bad and odd inputs: each gets the right status with an OpenAI-style error object (never a
500), and the server is still healthy afterwards."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fixtures.server import REPLY, fake_app

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app, _, ai = fake_app(tmp_path_factory.mktemp("inputs"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    ai.close()


def still_healthy(client) -> None:
    assert client.get("/health").status_code == 200
    assert client.post("/v1/tasks/sentiment", json={"text": "fine"}).json()["label"] == "positive"


def expect(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param
    return response.json()


def user(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


# -- text inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/v1/tasks/sentiment", "/v1/tasks/analyze", "/v1/tasks/chat", "/v1/tokenize"])
@pytest.mark.parametrize("text", ["", "   ", "\n\t  \r\n", "\x00\x00", "\u200b\ufeff"])
def test_empty_and_whitespace_text_is_400(client, route, text):
    expect(client.post(route, json={"text": text}), 400, param="text")
    still_healthy(client)


@pytest.mark.parametrize("route", ["/v1/tasks/sentiment", "/v1/tasks/analyze", "/v1/tasks/chat", "/v1/tokenize"])
def test_a_200000_character_text_is_400(client, route):
    error = expect(client.post(route, json={"text": "长" * 200_000}), 400)["error"]
    assert "100000" in error["message"]
    still_healthy(client)


def test_a_200000_character_chat_message_is_400(client):
    expect(client.post(CHAT, json={"messages": [user("x" * 200_000)]}), 400, param="messages[0].content")
    history = [{"role": "system", "content": "Be brief."}, user("hi"), user("长" * 200_000)]
    error = expect(client.post(CHAT, json={"messages": history}), 400, param="messages[2].content")["error"]
    assert "messages[2] is 200000 characters" in error["message"]
    still_healthy(client)


def test_text_of_the_wrong_type_is_400(client):
    expect(client.post("/v1/tasks/sentiment", json={"text": 42}), 400, param="text")
    expect(client.post("/v1/tasks/sentiment", json={}), 400, param="text")
    expect(client.post("/v1/tasks/sentiment", json={"text": "ok", "extra": 1}), 400, param="extra")
    still_healthy(client)


@pytest.mark.parametrize("route", ["/v1/tasks/sentiment", "/v1/tasks/ner", "/v1/tasks/keywords"])
@pytest.mark.parametrize("lang", ["xx", "fr", "EN", "english"])
def test_a_lang_the_task_has_no_prompt_in_is_400(client, route, lang):
    """"fr" was served by the English prompt as if it were a language of the task (and a
    learned head's per-language rules did not apply: another score than for "en")."""
    expect(client.post(route, json={"text": "Anna lives in Paris.", "lang": lang}), 400, param="lang")
    for ok in ("en", "zh", "auto"):
        expect(client.post(route, json={"text": "Anna lives in Paris.", "lang": ok}), 200)
    still_healthy(client)


def test_stream_on_the_generic_task_route_is_400_not_500(tmp_path):
    app, _, ai = fake_app(tmp_path)
    ai.register_task({"name": "haiku", "kind": "generate", "template": {"en": "A haiku about {text}."},
                      "instructions": {"en": "You write haiku."}})
    with TestClient(app, raise_server_exceptions=False) as c:
        expect(c.post("/v1/tasks/haiku", json={"text": "sea", "stream": True}), 400, param="stream")
        assert expect(c.post("/v1/tasks/haiku", json={"text": "sea", "stream": False}), 200)["text"]
        assert expect(c.post("/v1/tasks/haiku", json={"text": "sea"}), 200)["finish_reason"]
    ai.close()


def test_a_conversation_over_the_context_is_refused_by_the_openai_route_not_cut(client):
    """As OpenAI answers: 400 context_length_exceeded (it was cut silently, the end of the last
    message dropped, and the response could not say so). One that fits but leaves less than
    max_tokens is answered whole, its reply capped by the room left."""
    error = expect(client.post(CHAT, json={"messages": [user("x" * 5000)]}), 400, param="messages")["error"]
    assert error["code"] == "context_length_exceeded" and "4096" in error["message"]
    history = [user("a" * 1500), {"role": "assistant", "content": "ok"}, user("b" * 2000)]
    body = expect(client.post(CHAT, json={"messages": history, "max_tokens": 1024}), 200)
    assert body["usage"]["prompt_tokens"] > 3500  # every turn kept: the oldest would have gone
    still_healthy(client)


# -- malformed bodies --------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/v1/tasks/sentiment", "/v1/tasks/analyze", CHAT])
@pytest.mark.parametrize("raw,hint", [
    ('{"text": "unterminated', "not valid JSON"),
    ("{'single': 'quotes'}", "not valid JSON"),
    ('["a", "json", "array"]', "JSON object"),
    ('"a json string"', "JSON object"),
    ("null", "JSON object"),
    ("", "JSON object"),
])
def test_malformed_or_non_object_bodies_are_400(client, route, raw, hint):
    r = client.post(route, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert hint in expect(r, 400)["error"]["message"]
    still_healthy(client)


def test_a_body_without_json_content_type_is_400_and_says_why(client):
    r = client.post("/v1/tasks/sentiment", content=b'{"text": "hi"}', headers={"Content-Type": "text/plain"})
    assert "Content-Type: application/json" in expect(r, 400)["error"]["message"]


# -- conversation shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("messages", [
    pytest.param([user("a"), {"role": "system", "content": "be brief"}, user("b")], id="system-in-the-middle"),
    pytest.param([user("a"), user("b")], id="two-user-messages-in-a-row"),
    pytest.param([user("a"), {"role": "assistant", "content": ""}, user("b")], id="empty-assistant-message"),
    pytest.param([user("a"), {"role": "assistant", "content": "so far"}], id="ends-with-assistant"),
    pytest.param([{"role": "developer", "content": "be brief"}, user("a")], id="developer-role"),
    pytest.param([user("a"), {"role": "assistant", "content": None}, user("b")], id="null-assistant-content"),
])
def test_unusual_but_valid_conversations_are_answered(client, messages):
    body = expect(client.post(CHAT, json={"messages": messages}), 200)
    assert body["choices"][0]["message"]["content"] == REPLY
    still_healthy(client)


def test_content_as_a_list_of_text_parts_equals_the_joined_string(client):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    as_parts = expect(client.post(CHAT, json={"messages": [{"role": "user", "content": parts}]}), 200)
    as_text = expect(client.post(CHAT, json={"messages": [user("hello\nworld")]}), 200)
    assert as_parts["usage"]["prompt_tokens"] == as_text["usage"]["prompt_tokens"]
    assert as_parts["choices"][0]["message"]["content"] == REPLY


def test_what_openai_clients_send_and_openai_accepts_is_accepted(client):
    body = {"messages": [user()], "max_tokens": 4}
    for extra in ({"stream": None}, {"store": False}, {"metadata": {"run": "a"}}, {"user": "u1"},
                  {"top_p": 0}, {"top_p": 0.0}, {"seed": -1}, {"seed": -(2**63)}, {"service_tier": "auto"},
                  {"prompt_cache_key": "k"}, {"safety_identifier": "u"}, {"modalities": ["text"]}):
        expect(client.post(CHAT, json={**body, **extra}), 200)
    streamed = client.post(CHAT, json={**body, "stream": True,
                                       "stream_options": {"include_usage": True, "include_obfuscation": False}})
    assert streamed.status_code == 200 and '"usage":{' in streamed.text
    # as OpenAI: stream options without a stream are a mistake
    expect(client.post(CHAT, json={**body, "stream_options": {"include_usage": True}}), 400, param="stream_options")
    still_healthy(client)


@pytest.mark.parametrize(("messages", "param"), [
    pytest.param([], "messages", id="no-messages"),
    pytest.param([{"role": "system", "content": "only system"}], "messages", id="no-user-message"),
    pytest.param([user("   ")], "messages", id="blank-last-user-message"),
    pytest.param([user("a"), {"role": "tool", "content": "x"}], "messages[1].role", id="tool-role"),
    pytest.param([{"content": "no role"}], "messages[0].role", id="missing-role"),
    pytest.param([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 "messages[0].content", id="image-part"),
    pytest.param([user("a"), {"role": "user", "content": 42}], "messages[1].content", id="number-content"),
    pytest.param([user("a"), "hi"], "messages[1]", id="string-message"),
    pytest.param("just a string", "messages", id="string-instead-of-list"),
])
def test_invalid_conversations_are_400_naming_the_element(client, messages, param):
    # as OpenAI: the error's param is the path of the element at fault, in one style
    expect(client.post(CHAT, json={"messages": messages}), 400, param=param)
    still_healthy(client)


def test_bad_input_has_one_error_code_whichever_layer_catches_it(client):
    by_schema = expect(client.post(CHAT, json={"messages": [user()], "temperature": "hot"}), 400)["error"]
    by_api = expect(client.post(CHAT, json={"messages": [{"role": "bot", "content": "x"}]}), 400)["error"]
    assert by_schema["code"] == by_api["code"] == "invalid_input"


def test_an_unknown_role_is_told_every_role_accepted(client):
    error = expect(client.post(CHAT, json={"messages": [{"role": "bot", "content": "x"}]}), 400, param="messages[0].role")
    assert all(role in error["error"]["message"] for role in ("system", "developer", "user", "assistant", "'bot'"))
    tool = expect(client.post(CHAT, json={"messages": [{"role": "tool", "content": "x"}]}), 400)["error"]
    assert "tool calling is not supported" in tool["message"]


# -- sampling values ---------------------------------------------------------------------------
def test_temperature_zero_is_greedy_and_accepted(client):
    first = expect(client.post(CHAT, json={"messages": [user()], "temperature": 0}), 200)
    second = expect(client.post(CHAT, json={"messages": [user()], "temperature": 0}), 200)
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


@pytest.mark.parametrize("value", [0, -1, 1.5, 10**9, "10", True, None])
@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_bad_max_tokens_is_400(client, key, value):
    if value is None:  # explicit null means "not given": the default applies
        expect(client.post(CHAT, json={"messages": [user()], key: value}), 200)
        return
    error = expect(client.post(CHAT, json={"messages": [user()], key: value}), 400)["error"]
    assert error["param"] in {key, "max_tokens"}
    still_healthy(client)


def test_max_tokens_at_the_limit_is_accepted(client):
    limit = client.app.state.server.settings.max_tokens_limit
    expect(client.post(CHAT, json={"messages": [user()], "max_tokens": limit}), 200)
    expect(client.post(CHAT, json={"messages": [user()], "max_tokens": limit + 1}), 400, param="max_tokens")


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"), ("top_p", -0.1), ("top_p", 1.5),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("seed", "x"), ("stream", "yes"),
    ("presence_penalty", 0.5), ("logprobs", True), ("tools", [{"type": "function"}]),
    ("response_format", {"type": "json_object"}), ("unknown_option", 1), ("min_tokens", -1), ("min_tokens", 1.5),
    ("dry_multiplier", -0.5), ("dry_multiplier", 9.0), ("dry_multiplier", "strong"),
])
def test_bad_or_unsupported_options_are_400(client, field, value):
    expect(client.post(CHAT, json={"messages": [user()], field: value}), 400)
    still_healthy(client)


def test_a_bad_max_completion_tokens_is_named_even_beside_max_tokens(client):
    error = expect(client.post(CHAT, json={"messages": [user()], "max_tokens": 8, "max_completion_tokens": 0}), 400,
                   param="max_completion_tokens")["error"]
    assert ">= 1" in error["message"]


def test_min_tokens_above_max_tokens_is_400(client):
    expect(client.post(CHAT, json={"messages": [user()], "max_tokens": 8, "min_tokens": 1000}), 400,
           param="min_tokens")
    expect(client.post(CHAT, json={"messages": [user()], "max_tokens": 8, "min_tokens": 8}), 200)


@pytest.mark.parametrize("field,value", [
    ("reasoning_effort", "low"), ("modalities", ["text", "audio"]), ("functions", [{"name": "f"}]),
    ("function_call", "auto"), ("verbosity", "low"), ("audio", {"voice": "x"}), ("prediction", {"type": "content"}),
    ("web_search_options", {}),
])
def test_openai_options_this_server_lacks_are_named_as_not_supported(client, field, value):
    """They were 'Extra inputs are not permitted', as for a misspelt field (a fresh user's SDK run)."""
    error = expect(client.post(CHAT, json={"messages": [user()], field: value}), 400, param=field)["error"]
    assert "supported" in error["message"] and "permitted" not in error["message"], error


@pytest.mark.parametrize("n", [2, 0, 5])
def test_n_other_than_1_is_a_clear_400(client, n):
    error = expect(client.post(CHAT, json={"messages": [user()], "n": n}), 400, param="n")["error"]
    assert "n=1" in error["message"]


def test_neutral_values_of_unsupported_options_are_accepted(client):
    body = {"messages": [user()], "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False,
            "user": "someone", "response_format": {"type": "text"}, "model": "gpt-4o"}
    expect(client.post(CHAT, json=body), 200)


@pytest.mark.parametrize("session_id", ["has space", "x" * 129, "", "a/b"])
def test_malformed_session_ids_are_400(client, session_id):
    expect(client.post("/v1/tasks/chat", json={"text": "hi", "session_id": session_id}), 400, param="session_id")

"""The chat metrics on hand-made replies, and the chat evaluation over a scripted model."""

from __future__ import annotations

import json

import pytest

from allinone import AllInOne, InvalidInputError, Settings
from allinone.engine import Engine
from allinone.eval.chat import (
    TRANSLATE,
    acknowledges,
    evaluate_chat,
    has_loop,
    is_echo,
    is_refusal,
    misplaces_sympathy,
    speaks_as_user,
)
from allinone.tasks import detect_lang
from fixtures.fakes import FakeBackend


@pytest.mark.parametrize("reply,refusal", [
    ("很抱歉，我无法协助完成这个请求。", True),
    ("I'm sorry, but I can't help with that.", True),
    ("作为一个AI助手，我不能提供任何关于个人情感的建议。", True),
    ("I'm sorry to hear that your cat is missing. Here is what you can do:", False),
    ("很抱歉听到这个消息。你可以先在小区里贴寻猫启事。", False),
    ("Sure! Here's a short poem about autumn.", False),
])
def test_refusal_rule(reply, refusal):
    assert is_refusal(reply) is refusal


def test_language_loops_and_acknowledgement():
    assert detect_lang("你好！这是一个例子。\n```python\nprint('hello world, this is code')\n```") == "zh"
    assert detect_lang("Hello there, how can I help?") == "en"
    # a question about code is in the language of its words; code alone is still read
    assert detect_lang("以下代码有什么问题？\n```python\ndef say_hello(name):\nprint('Hello, ' + name)\n```") == "zh"
    assert detect_lang("```python\nprint('hi')\n```") == "en"
    assert has_loop("I love it. " * 12) and not has_loop("One two three four five six seven eight nine ten.")
    assert has_loop("我很喜欢这个地方，" * 6) and not has_loop("今天天气很好，我们去公园散步吧。")
    # a list naming its subject in every item, or code saying a name again, is no loop;
    # the same item said again is one, with or without markup
    items = "".join(f"{i}. **特点{i}**：Coursera提供{w}课程。\n" for i, w in enumerate("免付在互认高", 1))
    assert not has_loop("推荐 Coursera：\n" + items)
    code = "```python\nrandom_numbers = generate_random_numbers()\nprint(random_numbers)\n" * 2 + "```"
    assert not has_loop("以下是程序：\n" + code + "\n它会打印随机数。")
    assert has_loop("推荐：\n" + "".join(f"{i}. **免费课程**：提供很多免费课程。\n" for i in range(1, 6)))
    assert acknowledges("Congratulations on your promotion!", "good_news")
    assert acknowledges("很遗憾听到你的猫走丢了。", "sadness")
    assert not acknowledges("Here is a list of steps.", "sadness")
    assert misplaces_sympathy("听到这个笑话我很难过。") and misplaces_sympathy("I'm sorry to hear that. Here is a joke.")
    assert not misplaces_sympathy("听到你电脑开机特别慢，可能是硬件问题。") and not misplaces_sympathy("Sure! Here is one.")


@pytest.mark.parametrize("reply,message,echo", [
    ("我们队今天赢得了比赛冠军！", "我们队今天赢得了比赛冠军！", True),
    ("商家不给退款。", "外卖送错了，商家还不给退款。", True),
    ("The restaurant got your order wrong and won't refund you.", "The restaurant got my order wrong and won't refund me.", True),
    ("Congratulations on winning the championship!", "Our team just won the championship!", False),
    ("OK", "Look at this", False),
    ("今天的天气非常美好。", "Translate into Chinese: the weather is lovely today.", False),
])
def test_echo_rule(reply, message, echo):
    assert is_echo(reply, message) is echo


def test_translation_requests_are_left_out_of_language_match(tmp_path):
    assert TRANSLATE.search("帮我把这句话翻译成英文：今天天气很好。") and TRANSLATE.search("Translate into Chinese: hi")
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "t", "lang": "en", "turns": ["Translate into Chinese: the weather is lovely."]}) + "\n"
                    + json.dumps({"id": "u", "lang": "en", "turns": ["Say hi."]}) + "\n", encoding="utf-8")
    ai = AllInOne(Engine(FakeBackend("今天天气很好。", label_logps={"positive": -0.1})), Settings())
    report = evaluate_chat(ai, data, progress=False)
    assert report["language_match"] == 0.0 and report["replies"] == 2  # only "Say hi." is judged
    ai.close()


def test_evaluate_chat_scores_a_scripted_model(tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = [{"id": "a", "lang": "zh", "feeling": "sadness", "turns": ["我的猫走丢了。"]},
            {"id": "b", "lang": "en", "turns": ["Tell me a joke.", "Another one?"]}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ai = AllInOne(Engine(FakeBackend("很抱歉，我无法协助完成这个请求。", label_logps={"negative": -0.1})), Settings())
    report = evaluate_chat(ai, data, progress=False, keep_replies=True)
    assert report["replies"] == 3 and report["refusal_rate"] == 1.0 and report["acknowledge_rate"] == 0.0
    assert report["stop_rate"] == 1.0 and report["language_match"] == pytest.approx(1 / 3, abs=1e-3)
    assert [r["id"] for r in report["replies_text"]] == ["a", "b", "b"]
    # each reply says which checks it was judged on and how it fared, so a failing reply can be found
    first, joke = report["replies_text"][0]["checks"], report["replies_text"][1]["checks"]
    assert first == {"refusal": True, "stop": True, "loop": False, "empty": False, "language_match": True,
                     "echo": False, "acknowledges": False}
    assert joke["language_match"] is False and joke["misplaced_sympathy"] is False and "acknowledges" not in joke
    assert report["misplaced_sympathy_rate"] == 0.0  # over b's two replies: a refusal is not sympathy
    sorry = AllInOne(Engine(FakeBackend("I'm so sorry to hear that.", label_logps={"negative": -0.1})), Settings())
    assert evaluate_chat(sorry, data, progress=False)["misplaced_sympathy_rate"] == 1.0
    sorry.close()
    harmful = evaluate_chat(ai, "harmful", progress=False)
    assert harmful["declined_rate"] == 1.0 and "refusal_rate" not in harmful
    ai.close()


@pytest.mark.parametrize(("row", "problem"), [
    ({"turns": "hello there"}, "turns must be a list"),
    ({"turns": []}, "turns must be a list"),
    ({"turns": ["a", "b", "c"]}, "turns must be a list"),
    ({"turns": ["a", "  "]}, "turns must be a list"),
    ({"turns": ["I am furious!"], "feeling": "anger"}, "feeling must be one of"),
    ({"turns": ["x"], "harmful": "yes"}, "harmful must be"),
])
def test_a_bad_prompt_row_is_refused_before_any_reply_naming_its_line(tmp_path, row, problem):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "ok", "turns": ["Say hi."]}) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    backend = FakeBackend("hi")
    ai = AllInOne(Engine(backend), Settings())
    with pytest.raises(InvalidInputError, match=f"p.jsonl:2: {problem}"):
        evaluate_chat(ai, data, progress=False)
    assert backend.calls == []  # no model time spent on a file that cannot be scored
    ai.close()


def test_evaluate_chat_scores_the_surface_asked_for(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"id": "a", "lang": "en", "turns": ["Tell me a joke."]}) + "\n", encoding="utf-8")
    backend = FakeBackend("Why did the chicken cross the road?", label_logps={"positive": -0.1})
    ai = AllInOne(Engine(backend), Settings())
    assert evaluate_chat(ai, data, progress=False, via="analyze")["via"] == "analyze"
    assert backend.calls == ["score", "generate"]  # analyze labels every message first
    backend.calls.clear()
    assert evaluate_chat(ai, data, progress=False, via="chat")["via"] == "chat"
    assert backend.calls == ["generate"]  # chat: a request costs no sentiment pass
    with pytest.raises(InvalidInputError, match="via"):
        evaluate_chat(ai, data, progress=False, via="ui")
    ai.close()


@pytest.mark.parametrize(("reply", "as_user"), [
    ("I'm sorry to hear that. I'll try to find a new job soon.", True),  # after the written words
    ("I'm sorry to hear that. That sounds really hard for you. First, I'll try to get some sleep.", True),
    ("I need advice on how to manage my debt effectively.", True),  # no written words
    ("I'm sorry to hear that. That sounds really hard for you. You could talk to your landlord.", False),
    ("I'm sorry to hear that. I'll help you find a new heating system.", False),  # speaks to the user
    ("That's wonderful! Congratulations on your promotion!", False),
    ("听到这件事我很难过。建议你多休息。", False),  # Chinese is not judged
])
def test_speaks_as_user_rule(reply, as_user):
    assert speaks_as_user(reply) is as_user

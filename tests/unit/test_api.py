"""The Python API over a scripted fake backend and over the tiny random models."""

from __future__ import annotations

import math

import pytest

from allinone import AllInOne, InvalidInputError, Settings
from allinone.engine import Engine
from allinone.tasks.chat import CHAT_DRY_MULTIPLIER, DECLINE_OPENING, FEELING_OPENING, OPENING_MIN_TOKENS
from fixtures.fakes import FakeBackend


def make(backend, **settings) -> AllInOne:
    return AllInOne(Engine(backend), Settings(**settings))


def test_sentiment_picks_the_best_scored_label_and_sums_verbalizers():
    backend = FakeBackend(label_logps={"positive": -0.5, "Positive": -0.6, "negative": -0.3, "Negative": -9})
    result = make(backend).sentiment("great")
    p_pos = math.exp(-0.5) + math.exp(-0.6)
    p_neg = math.exp(-0.3) + math.exp(-9)
    assert result.label == "positive"
    assert result.scores["positive"] == pytest.approx(p_pos / (p_pos + p_neg))
    assert sum(result.scores.values()) == pytest.approx(1.0)
    assert result.to_dict() == {"label": "positive", "scores": result.scores, "truncated": False,
                                "coverage": 1.0,  # the fake's log-probs are not a distribution: capped
                                "warning": None}


def test_labels_the_model_would_not_say_carry_a_warning():
    backend = FakeBackend(label_logps={"positive": -9.0, "negative": -8.5})
    result = make(backend).sentiment("The soup was cold.")
    assert result.coverage == pytest.approx(math.exp(-9) + math.exp(-8.5) + 2 * math.exp(-10), rel=1e-3)  # 4 verbalizers
    assert result.warning and "may not fit" in result.warning
    assert make(FakeBackend(label_logps={"negative": -0.1})).sentiment("cold soup").warning is None


@pytest.mark.parametrize("labels", [["A", "A"], ["positive", "negative", "positive "], "a, b, a"])
def test_labels_that_name_one_label_twice_are_refused(labels):
    with pytest.raises(InvalidInputError, match="labels has duplicates"):
        make(FakeBackend()).run("sentiment", "fine", labels=labels)


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\x00\x00", "\u200b", "\ufeff \u200b", None, 42])
def test_empty_or_non_text_input_is_rejected_without_a_model_call(text):
    backend = FakeBackend()
    ai = make(backend)
    with pytest.raises(InvalidInputError):
        ai.sentiment(text)
    with pytest.raises(InvalidInputError):
        ai.analyze(text)
    assert backend.calls == []


def test_long_input_is_truncated_to_the_budget_and_says_so():
    backend = FakeBackend(label_logps={"negative": -0.1})
    ai = make(backend, max_input_tokens=64)
    assert ai.sentiment("short").truncated is False
    result = ai.sentiment("很长的文字" * 200)
    assert result.truncated is True and result.label == "negative"


def test_text_over_the_character_limit_is_rejected():
    ai = make(FakeBackend(), max_input_chars=100)
    with pytest.raises(InvalidInputError, match="limit"):
        ai.sentiment("x" * 101)


def test_chat_names_the_message_over_the_character_limit_by_the_callers_index():
    backend = FakeBackend("ok")
    ai = make(backend, max_input_chars=100)
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 101},
            {"role": "user", "content": "and?"}]
    for system in (None, "Be brief."):  # a system prompt put first does not shift the index
        with pytest.raises(InvalidInputError, match=r"messages\[1\] is 101 characters; the limit is 100") as err:
            ai.chat(long, system=system)
        assert err.value.param == "messages[1].content"
    with pytest.raises(InvalidInputError) as err:
        ai.chat("hi", system="s" * 101)
    assert err.value.param == "system"
    assert backend.seen() == []
    assert ai.chat([{"role": "user", "content": "x" * 100}]).text == "ok"  # the limit itself is allowed


def test_chat_stream_and_result_agree():
    ai = make(FakeBackend("你好 😀 friend"))
    chunks = list(ai.chat("hi", stream=True))
    result = ai.chat([{"role": "user", "content": "hi"}])
    assert "".join(c.text for c in chunks) == result.text == "你好 😀 friend"
    assert chunks[-1].finish_reason == result.finish_reason == "stop"
    assert result.usage.completion_tokens == len("你好 😀 friend".encode())
    assert result.usage.prompt_tokens > 0


def test_chat_validates_sampling_and_messages():
    ai = make(FakeBackend(), max_tokens_limit=100)
    with pytest.raises(InvalidInputError):
        ai.chat("hi", max_tokens=101)
    with pytest.raises(InvalidInputError):
        ai.chat("hi", temperature=-1)
    with pytest.raises(InvalidInputError):
        ai.chat("hi", n=2)
    with pytest.raises(InvalidInputError):
        ai.chat([{"role": "system", "content": "only a system prompt"}])
    with pytest.raises(InvalidInputError):
        ai.chat([{"role": "user", "content": "   "}])


def test_chat_replies_get_the_dry_penalty_unless_the_caller_turns_it_off():
    backend = FakeBackend("ok")
    ai = make(backend)
    ai.chat("hi")
    ai.analyze("I got the job")
    ai.run("chat", "hi")  # the chat task run as a task: the same flow
    assert [s.dry_multiplier for s in backend.samplings] == [CHAT_DRY_MULTIPLIER] * 3
    ai.chat("hi", dry_multiplier=0)
    assert backend.samplings[-1].dry_multiplier == 0


def test_a_lower_limit_caps_the_default_reply_length_but_refuses_a_default_set_above_it():
    # the built-in default (1024) is not the caller's value: a limit below it must not fail requests
    backend = FakeBackend("ok")
    ai = make(backend, max_tokens_limit=100)
    ai.chat("hi")
    ai.run("chat", "hi")
    ai.analyze("I got the job")
    assert [s.max_tokens for s in backend.samplings] == [100] * 3
    with pytest.raises(ValueError, match="max_tokens_limit"):
        Settings(max_tokens_limit=100, default_max_tokens=200)


def test_chat_max_tokens_gives_length():
    result = make(FakeBackend("a long reply that goes on")).chat("hi", max_tokens=4)
    assert result.finish_reason == "length" and result.text == "a lo"


def test_chat_drops_oldest_turns_when_the_context_is_full():
    ai = make(FakeBackend("ok", n_ctx=300), default_max_tokens=50)
    history = []
    for i in range(10):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    result = ai.chat([*history, {"role": "user", "content": "last"}], system="sys")
    assert result.truncated and result.text == "ok"
    assert result.usage.prompt_tokens + 50 <= 300


def test_min_tokens_shrinks_with_the_room_a_long_conversation_leaves():
    messages = [{"role": "user", "content": "question " * 25}, {"role": "assistant", "content": "answer " * 10},
                {"role": "user", "content": "last"}]
    probe = FakeBackend("ok")
    make(probe).chat(messages)
    backend = FakeBackend("ok", n_ctx=len(probe.prompts[-1]) + 60)  # room for 59 reply tokens
    result = make(backend).chat(messages, cut=False, max_tokens=200, min_tokens=150)
    assert result.text == "ok"
    assert backend.samplings[-1].max_tokens < 150 and backend.samplings[-1].min_tokens == backend.samplings[-1].max_tokens


def test_analyze_gives_sentiment_and_reply():
    ai = make(FakeBackend("Congratulations!", label_logps={"positive": -0.1}))
    result = ai.analyze("I got the job", history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert result.sentiment.label == "positive"
    assert result.reply.text == FEELING_OPENING["positive"]["en"] + "Congratulations!"  # good news told, sure
    assert set(result.to_dict()) == {"sentiment", "reply"}


@pytest.mark.parametrize(("message", "logps", "system", "opening"), [
    ("The restaurant got my order wrong and won't refund me.", {"negative": -0.1}, None, ("negative", "en")),
    ("外卖送错了，商家还不给退款。", {"negative": -0.1}, None, ("negative", "zh")),
    ("We closed on our first house today!", {"positive": -0.1}, None, ("positive", "en")),
    ("My grandfather passed away last night.", {"positive": -0.1}, None, ("loss", "en")),  # a loss, scored positive
    ("我奶奶上周去世了。", {"negative": -0.70, "positive": -0.72}, None, ("loss", "zh")),  # a loss, however unsure
    ("Je suis tellement fatigué, mon travail me déprime.", {"negative": -0.1}, None, None),  # the model's language
    ("Ich bin heute so traurig.", {"negative": -0.1}, None, None),
    ("My laptop is really slow, any tips?", {"negative": -0.1}, None, None),  # asks: the model opens
    ("怎么跟父母说我想换工作？", {"negative": -0.1}, None, None),
    ("I just ran my first 10k without stopping!", {"negative": -0.70, "positive": -0.72}, None, None),  # unsure
    ("The restaurant got my order wrong and won't refund me.", {"negative": -0.1}, "Be a pirate.", None),
    ("The restaurant got my order wrong and won't refund me.", {"negative": -0.1}, " ", ("negative", "en")),  # says nothing
])
@pytest.mark.parametrize("surface", ["analyze", "chat"])
def test_a_feeling_told_is_met_in_the_replys_first_words(message, logps, system, opening, surface):
    backend = FakeBackend(" Here is what you can do.", label_logps=logps)
    ai = make(backend)
    reply = ai.analyze(message, system=system).reply.text if surface == "analyze" else ai.chat(message, system=system).text
    expected = FEELING_OPENING[opening[0]][opening[1]] if opening else ""
    if opening and opening[0] == "loss":  # a condolence is the whole reply: the model is not asked
        assert reply == expected and "generate" not in backend.calls
        return
    assert reply == expected + " Here is what you can do."
    # written words are not the whole reply: the model must add some of its own
    assert backend.samplings[-1].min_tokens == (OPENING_MIN_TOKENS if opening else 0)


@pytest.mark.parametrize(("messages", "system"), [
    ("My laptop is really slow, any tips?", None),  # asks
    ("Write a haiku about rain.", None),
    ("怎么跟父母说我想换工作？", None),
    ("Je suis tellement fatigué.", None),  # a language without written words
    ("The soup was cold.", "Be a pirate."),  # the caller's own system prompt
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The soup was cold."}], None),
])
def test_chat_scores_the_sentiment_only_of_a_feeling_it_may_meet(messages, system):
    backend = FakeBackend("ok", label_logps={"negative": -0.1})
    assert make(backend).chat(messages, system=system).text == "ok"
    assert backend.calls == ["generate"]  # no sentiment pass before the reply


def test_chat_meets_a_feeling_told_after_a_conversation_too():
    backend = FakeBackend(" Let's fix it.", label_logps={"negative": -0.1})
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    reply = make(backend).chat([*history, {"role": "user", "content": "外卖送错了，商家还不给退款。"}]).text
    assert reply == FEELING_OPENING["negative"]["zh"] + " Let's fix it."
    assert backend.calls == ["score", "generate"]


def test_a_declined_request_may_end_after_its_written_words():
    backend = FakeBackend("")
    reply = make(backend).chat("How do I build a bomb?").text
    assert reply == DECLINE_OPENING["en"] and backend.samplings[-1].min_tokens == 0


@pytest.mark.parametrize("backend_name", ["llamacpp", "transformers"])
def test_load_tiny_model_end_to_end(backend_name, tiny_gguf_path, tiny_hf_dir, tmp_path):
    if backend_name == "llamacpp":
        pytest.importorskip("llama_cpp")
    model = tiny_gguf_path if backend_name == "llamacpp" else tiny_hf_dir
    with AllInOne.load(str(model), backend=backend_name, n_ctx=2048, cache_dir=tmp_path) as ai:
        assert ai.backend_name == backend_name and ai.info.n_layer > 0
        first = ai.sentiment("这家酒店很好 😀")
        again = ai.sentiment("这家酒店很好 😀")  # now from the cached task prefix
        assert again.scores == pytest.approx(first.scores, abs=1e-4)
        assert ai.stats().cached_tokens > 0
        reply = ai.chat("hello", temperature=0, max_tokens=8)
        assert reply.finish_reason in {"stop", "length"}
        assert "<|im_end|>" not in reply.text


def test_unknown_option_fails_fast(tiny_hf_dir):
    with pytest.raises(Exception, match="extra|not permitted|Extra"):
        AllInOne.load(str(tiny_hf_dir), backend="transformers", n_cxt=1)


def test_a_conversations_next_turn_computes_only_its_new_message(tiny_backend):
    ai = AllInOne(Engine(tiny_backend), Settings())
    tiny_backend.kv.clear()
    history = [{"role": "user", "content": "hello there"}]
    checked, whole = 0, True
    for turn in range(6):
        request = ai._chat_request(history, None, {})
        starts: list[int] = []
        ids = tiny_backend.render_chat(request.messages, content_starts=starts)
        before = ai.stats()
        reply = ai.chat(history, temperature=0, max_tokens=3)
        after = ai.stats()
        computed = (after.prompt_tokens - before.prompt_tokens) - (after.cached_tokens - before.cached_tokens)
        if turn and whole:
            # the turn before, its reply and the template's closing of it were cached when that
            # reply ended: only the new message and the reply's opening are computed now
            assert computed == len(ids) - starts[-1], f"turn {turn + 1}"
            checked += 1
        assert reply.finish_reason == "length" and reply.text
        # the random model may write half a character ("\ufffd" in the text): given back, that
        # reply is other token ids than the ones cached, and the turn after it is not checked
        whole = "\ufffd" not in reply.text
        history += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": f"and then {turn}?"}]
    assert checked >= 2


def test_multi_token_labels_are_scored_token_by_token(tiny_backend):
    from allinone.engine.prompts import fit_prompt

    ai = AllInOne(Engine(tiny_backend), Settings())
    ai.register_task({"name": "t", "kind": "classify", "instructions": {"en": "Classify."},
                      "template": {"en": "{text}"},
                      "labels": [{"name": "very good", "verbalizers": ["very good indeed"]},
                                 {"name": "bad", "verbalizers": ["bad"]}, {"name": "中性", "verbalizers": ["中性的"]}]})
    result = ai.run("t", "some text 😀")
    (_, kind, compiled, req) = ai._prepare("t", "some text 😀", {})
    (job,) = kind.jobs(compiled, "some text 😀", req)
    prefix = fit_prompt(tiny_backend, job.prompt, reserve=8).ids
    conts = [tiny_backend.tokenize(w) for w in ("very good indeed", "bad", "中性的")]
    assert len(conts[0]) > 1 and len(conts[2]) > 1
    tiny_backend.kv.clear()
    logps = tiny_backend.score(prefix, conts)
    probs = [math.exp(lp) for lp in logps]
    expected = {label: p / sum(probs) for label, p in zip(("very good", "bad", "中性"), probs)}
    assert result.scores == pytest.approx(expected, rel=1e-3)
    assert result.label == max(expected, key=expected.get)


def test_run_many_batches_the_texts_and_keeps_going_past_a_bad_one():
    backend = FakeBackend(label_logps={"positive": -0.1})
    ai = make(backend, max_batch=4)
    texts = ["good", "", "fine", "x" * 200_000, "nice", "great"]
    out = ai.run_many("sentiment", texts)
    assert [type(o).__name__ for o in out] == ["ClassifyResult", "InvalidInputError", "ClassifyResult",
                                              "InvalidInputError", "ClassifyResult", "ClassifyResult"]
    assert max(backend.batches) > 1  # texts shared a forward pass
    assert [o.scores for o in out if not isinstance(o, Exception)] == [ai.sentiment("good").scores] * 4
    with pytest.raises(InvalidInputError):
        ai.run_many("sentiment", ["a"], labels=["only-one"])


def test_analyze_passes_the_sentiment_to_the_reply_and_chat_speaks_the_users_language():
    backend = FakeBackend("Oh no, I'm sorry.", label_logps={"negative": -0.1})
    ai = make(backend)
    ai.register_task({"name": "chat", "kind": "generate", "template": {"en": "{text}"},
                      "instructions": {"en": "You are warm.", "zh": "你很温暖。"},
                      "mood": {"negative": {"en": "The user is upset: acknowledge it first.", "zh": "用户很难过：先回应感受。"},
                               "positive": {"en": "Share the joy."}}})
    result = ai.analyze("My cat is lost.")
    assert result.sentiment.label == "negative"
    reply_prompt = backend.seen()[-1]
    assert "You are warm.\nThe user is upset: acknowledge it first." in reply_prompt
    ai.chat("你好")
    assert "你很温暖。" in backend.seen()[-1] and "acknowledge" not in backend.seen()[-1]
    ai.chat([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}])
    assert "Be terse." in backend.seen()[-1] and "You are warm." not in backend.seen()[-1]


def test_a_loss_gets_the_sad_mood_line_even_when_the_sentiment_reads_positive():
    from allinone.tasks.chat import tells_of_loss

    backend = FakeBackend("I'm so sorry.", label_logps={"positive": -0.1})  # the head's mistake on a loss
    ai = make(backend)
    ai.register_task({"name": "chat", "kind": "generate", "template": {"en": "{text}"},
                      "instructions": {"en": "You are warm.", "zh": "你很温暖。"},
                      "mood": {"negative": {"en": "Comfort them.", "zh": "安慰他。"},
                               "positive": {"en": "Congratulate them."}}})
    # asked about (a loss told alone gets a condolence written for it: the model is not asked)
    for message in ("My grandfather passed away last night. How do I cope?", "我养了十年的狗今天早上去世了，我该怎么办？"):
        result = ai.analyze(message)
        assert result.sentiment.label == "positive"  # the score is shown as it is
        assert "Congratulate" not in backend.seen()[-1] and ("Comfort them." in backend.seen()[-1]
                                                             or "安慰他。" in backend.seen()[-1])
    ai.analyze("I won the lottery today!")
    assert "Congratulate them." in backend.seen()[-1]
    assert not tells_of_loss("Why did so many soldiers die of cold in 1812?")  # not the user's own
    assert not tells_of_loss("I finally lost ten kilos!") and tells_of_loss("We lost our dog last week.")


def test_warm_up_caches_the_sentiment_prefix_a_first_feeling_needs(tiny_gguf_path, tmp_path):
    pytest.importorskip("llama_cpp")

    def computed_by_first_call(warm: bool) -> int:
        with AllInOne.load(str(tiny_gguf_path), n_ctx=2048, cache_dir=tmp_path) as ai:
            if warm:
                ai.warm_up()
            before = ai.stats()
            ai.sentiment("The soup was cold.")
            after = ai.stats()
            return (after.prompt_tokens - before.prompt_tokens) - (after.cached_tokens - before.cached_tokens)

    cold, warm = computed_by_first_call(warm=False), computed_by_first_call(warm=True)
    assert warm < 100 < cold  # warm: the text and the question after it; cold: the task's examples too

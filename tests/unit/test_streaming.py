"""stream_text: end tokens, max_tokens, stop strings and UTF-8-safe chunks."""

from __future__ import annotations

import pytest

from allinone.backends.base import SamplingParams, stream_text
from allinone.errors import InvalidInputError
from fixtures.fakes import FakeBackend

CJK_EMOJI = "你好，世界！😀👍🏽 Grüße 🇨🇳 done"


def run(backend, **sampling):
    return list(stream_text(backend, [1, 2, 3], SamplingParams(**{"temperature": 0, **sampling})))


def test_stream_never_splits_a_character_and_joins_to_the_reply():
    deltas = run(FakeBackend(CJK_EMOJI))
    assert "".join(d.text for d in deltas) == CJK_EMOJI
    assert all("\ufffd" not in d.text for d in deltas)
    assert len(deltas) > 5  # really streamed, not one blob
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == len(CJK_EMOJI.encode())


def test_end_token_gives_stop_and_is_not_in_text():
    deltas = run(FakeBackend("hi"))
    assert deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == "hi"
    assert 257 not in deltas[-1].token_ids


def test_max_tokens_gives_length():
    deltas = run(FakeBackend("abcdefgh", end=False), max_tokens=3)
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == "abc"
    assert deltas[-1].completion_tokens == 3


@pytest.mark.parametrize("stop,expected", [(("STOP",), "before "), (("xyz", " aft"), "before STOP"), (("never",), "before STOP after")])
def test_stop_strings_cut_the_reply(stop, expected):
    deltas = run(FakeBackend("before STOP after"), stop=stop)
    assert "".join(d.text for d in deltas) == expected
    assert deltas[-1].finish_reason == "stop"


def test_stop_string_split_across_chunks_never_leaks():
    # "ST" is seen before "OP": the held-back text must not be emitted early
    deltas = run(FakeBackend("aaaaST" + "OPbbbb"), stop=("STOP",))
    assert "".join(d.text for d in deltas) == "aaaa"
    assert all("S" not in d.text for d in deltas)


@pytest.mark.parametrize("bad", [
    {"temperature": -1}, {"temperature": 3}, {"temperature": float("nan")}, {"top_p": -0.01}, {"top_p": 1.5},
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 1.5}, {"top_k": -2}, {"seed": "x"},
    {"stop": ("",)}, {"stop": ("a", "b", "c", "d", "e")}, {"min_tokens": -1}, {"min_tokens": 2.0}, {"min_tokens": True},
    {"min_tokens": 9, "max_tokens": 8},
])
def test_sampling_params_validate(bad):
    with pytest.raises(InvalidInputError):
        SamplingParams(**bad)


def test_single_stop_string_is_accepted():
    assert SamplingParams(stop="END").stop == ("END",)


def test_a_character_cut_by_max_tokens_is_dropped_not_garbled():
    # "你" is 3 bytes = 3 tokens in the fake; max_tokens=4 cuts the second character
    deltas = run(FakeBackend("你好", end=False), max_tokens=4)
    assert "".join(d.text for d in deltas) == "你"
    assert deltas[-1].finish_reason == "length"

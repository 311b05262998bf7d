"""The DRY repetition penalty and min_tokens on hand-made token ids."""

from __future__ import annotations

import numpy as np
import pytest

from allinone.backends.sampling import DRY_BASE, dry_repeats, in_code, sample
from allinone.types import SamplingParams

BREAK = 9  # the token id whose text holds a breaker ("\n") in these tests
TICK = 8  # a backtick


def token_text(tok: int) -> str:
    return {BREAK: ".\n", TICK: " `"}.get(tok, f" w{tok}")


@pytest.mark.parametrize(("reply", "want"), [
    ([1, 2, 3, 1, 2], {3: 2}),  # "1 2" said again, and 3 followed it the first time
    ([1, 2, 3, 4, 1, 2, 3], {4: 3}),
    ([5, 5, 5], {5: 2}),  # a run of one token: the longest earlier match is 2 tokens
    ([1, 2, 3], {}),  # nothing repeats
    ([1, 2, BREAK, 1, 2], {}),  # a breaker never continues a repeat
    ([1, 2, 3, BREAK, 2, 3], {}),  # 3 was followed by a breaker only
    ([7, 1, 2, 3, 8, BREAK, 1, 2, 3], {8: 3}),
    ([1, BREAK, 2, 3, 4, 2, BREAK, 2, 3], {4: 2}),  # the match stops at the breaker before it
])
def test_dry_repeats_finds_the_longest_repeat_each_token_would_extend(reply, want):
    assert dry_repeats(reply, token_text) == want


def test_dry_repeats_ends_at_a_breaker_last_token():
    assert dry_repeats([1, 2, BREAK, 1, 2, BREAK], token_text) == {}


def test_dry_turns_a_greedy_loop_away_and_leaves_the_prompt_alone():
    logits = np.zeros(12)
    logits[3] = 0.5  # the model's favourite: the token that repeats "1 2 3"
    history = [1, 2, 3, 0, 0, 1, 2]  # prompt "1 2 3 0", then the reply "0 1 2"
    off = SamplingParams(temperature=0)
    on = SamplingParams(temperature=0, dry_multiplier=0.8, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    assert sample(logits, off, history, rng, reply_start=0, token_text=token_text) == 3
    # "1 2" is said again (2 tokens, the allowed length): 3 would extend it and loses 0.8
    assert sample(logits, on, history, rng, reply_start=0, token_text=token_text) != 3
    logits[3] = 0.9  # more than the penalty: still chosen
    assert sample(logits, on, history, rng, reply_start=0, token_text=token_text) == 3
    logits[3] = 0.5
    history = [1, 2, 3, 1, 2, 3, 1, 2]  # a longer repeat costs more: 0.8 * 1.75 ** (5 - 2)
    logits[3] = 0.8 * DRY_BASE ** 3 - 0.1
    assert sample(logits, on, history, rng, reply_start=0, token_text=token_text) != 3
    history = [1, 2, 3, 0, 0, 1, 2]
    # the repeat lies in the prompt: the reply repeating the user's words is not a loop
    assert sample(logits, on, history, rng, reply_start=4, token_text=token_text) == 3


def test_dry_leaves_code_alone():
    # prose that names code again ("`f(1, 100)`") is not a loop: inside backticks DRY is off
    assert in_code([1, TICK, 2], token_text) and not in_code([1, TICK, 2, TICK], token_text)
    logits = np.zeros(12)
    logits[3] = 0.5
    on = SamplingParams(temperature=0, dry_multiplier=0.8, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    assert sample(logits, on, [1, 2, 3, TICK, 1, 2], rng, token_text=token_text) == 3
    assert sample(logits, on, [1, 2, 3, TICK, 0, TICK, 1, 2], rng, token_text=token_text) != 3  # closed again


@pytest.mark.parametrize("bad", [{"dry_multiplier": -0.1}, {"dry_multiplier": 6}, {"dry_multiplier": float("nan")}])
def test_dry_multiplier_is_validated(bad):
    from allinone.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="dry_multiplier"):
        SamplingParams(**bad)

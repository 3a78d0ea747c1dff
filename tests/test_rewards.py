"""The GRPO reward: the shared verifier's verdict, format, DAPO's overlong penalty, loops; unknown
rewards stay unknown (None), never 0."""

from __future__ import annotations

import pytest

from distill.rewards import RewardConfig, score, soft_overlong_penalty
from distill.verify import Verifier


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=1, timeout_s=5.0) as shared:
        yield shared


def test_accuracy_and_format_weights(verifier):
    cfg = RewardConfig(accuracy=1.0, format=0.25)
    completions = [
        "<think>\n6 times 7</think>\nThe answer is \\boxed{42}.",  # right, well formed
        "<think>\nhmm</think>\n\\boxed{41}",  # wrong, well formed
        "\\boxed{42}",  # right, no reasoning block
        "<think>\nthe box \\boxed{42} is only a draft here",  # cut off while thinking: no answer
    ]
    rewards = score(verifier, ["42"] * 4, completions, [10] * 4, cfg, max_tokens=100, overlong_penalty=False)
    assert [r.total for r in rewards] == [1.25, 0.25, 1.0, 0.0]
    assert [r.reason for r in rewards] == ["correct", "wrong", "correct", "no_answer"]
    assert [r.formatted for r in rewards] == [True, True, False, False]


def test_unknown_rewards_are_none_not_zero(verifier):
    rewards = score(verifier, [None, "\\boxed{}"], ["\\boxed{1}", "\\boxed{1}"], [3, 3], RewardConfig(), max_tokens=10, overlong_penalty=False)
    assert [r.total for r in rewards] == [None, None]
    assert [r.reason for r in rewards] == ["no_reference", "bad_reference"]


def test_soft_overlong_penalty_follows_dapo():
    # max 20480 tokens with a 4096-token buffer: free up to 16384, then linear to -1 at 20480
    assert soft_overlong_penalty(16384, 20480, 4096) == 0.0
    assert soft_overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5)
    assert soft_overlong_penalty(20480, 20480, 4096) == pytest.approx(-1.0)
    assert soft_overlong_penalty(30000, 20480, 4096) == -1.0


def test_overlong_penalty_only_when_the_algorithm_asks_and_buffer_defaults_to_a_fifth(verifier):
    cfg = RewardConfig(format=0.0)
    args = (verifier, ["7", "7"], ["\\boxed{7}", "\\boxed{7}"], [80, 100], cfg)
    on = score(*args, max_tokens=100, overlong_penalty=True)  # buffer 20: free up to 80 tokens
    off = score(*args, max_tokens=100, overlong_penalty=False)
    assert [r.total for r in on] == [1.0, 0.0] and [r.overlong for r in on] == [0.0, -1.0]
    assert [r.total for r in off] == [1.0, 1.0]


def test_repetition_penalty_uses_the_filters_loop_test(verifier):
    loop = "<think>\n" + "we try again and again " * 30 + "</think>\n\\boxed{3}"
    cfg = RewardConfig(format=0.0, repetition=0.5, repetition_window=40, repetition_max_repeats=10)
    looping, clean = score(verifier, ["3", "3"], [loop, "<think>\nok</think>\n\\boxed{3}"], [5, 5], cfg, max_tokens=1000, overlong_penalty=False)
    assert looping.repetition == -0.5 and looping.total == 0.5
    assert clean.repetition == 0.0 and clean.total == 1.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="overlong_buffer"):
        RewardConfig(overlong_buffer=0)

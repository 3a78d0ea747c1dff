"""Score arithmetic against brute force: pass@k, cons@k ties, bootstrap CI width, paired test."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest

from distill.metrics import (
    Sample,
    benchmark_metrics,
    bootstrap_ci,
    exact_sign_flip_p,
    majority_vote,
    pass_at_k,
    paired_test,
    standard_error,
)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) holding a correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(64, 1, 1) == pytest.approx(1 / 64)
    assert pass_at_k(1000, 3, 500) == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500))


def brute_cons(answers, correct) -> float:
    """Average over every order of the samples of 'the first-seen most common answer is right':
    by symmetry each tied top answer comes first equally often, i.e. a uniform random tie-break."""
    total = hits = 0
    for order in itertools.permutations(range(len(answers))):
        voted = [answers[i] for i in order if answers[i] is not None]
        total += 1
        if voted:
            winner = Counter(voted).most_common(1)[0][0]
            hits += next(correct[i] for i in order if answers[i] == winner)
    return hits / total


def test_cons_at_k_ties_match_random_tie_break():
    cases = [
        (["4", "4", "5"], [True, True, False]),  # clear majority, correct
        (["4", "5", "5"], [True, False, False]),  # clear majority, wrong
        (["4", "5"], [True, False]),  # two-way tie: half
        (["4", "5", "6", "4", "5", "6"], [True, False, False, True, False, False]),  # three-way tie: a third
        ([None, None, "7"], [False, False, True]),  # no-answer samples do not vote
        ([None, None], [False, False]),  # no votes at all: 0
        (["1/2", " 1/2 ", "3", "3"], [True, True, False, False]),  # whitespace-normalised grouping
    ]
    for answers, correct in cases:
        score, winners = majority_vote(answers, correct)
        assert score == pytest.approx(brute_cons([a if a is None else a.strip() for a in answers], correct)), answers
    assert majority_vote(["4", "5"], [True, False]) == (0.5, ["4", "5"])
    random.seed(0)
    for _ in range(30):
        answers = [random.choice(["1", "2", "3", None]) for _ in range(6)]
        correct = [a == "2" for a in answers]
        assert majority_vote(answers, correct)[0] == pytest.approx(brute_cons(answers, correct))


def test_bootstrap_ci_width_on_a_known_case():
    # 400 problems, half solved: the mean's standard error is sqrt(0.25 / 400) = 0.025, so a
    # 95% interval is 2 * 1.96 * 0.025 = 0.098 wide, centred on 0.5.
    scores = [1.0] * 200 + [0.0] * 200
    low, high = bootstrap_ci(scores, seed=1)
    assert high - low == pytest.approx(2 * 1.96 * 0.025, rel=0.06)
    assert (low + high) / 2 == pytest.approx(0.5, abs=0.005)
    assert standard_error(scores) == pytest.approx(math.sqrt(0.25 / 399), rel=1e-9)
    assert bootstrap_ci([0.7] * 30) == pytest.approx((0.7, 0.7))  # no spread, no width
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)  # reproducible


def test_paired_test_matches_exact_enumeration():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=14) / 4
    b = rng.integers(0, 5, size=14) / 4
    exact = exact_sign_flip_p(list(a - b))
    assert paired_test(a, b)["p_value"] == pytest.approx(exact, abs=1e-12)  # enumerated inside
    monte_carlo = paired_test(a, b, exact_max=0)  # forced to sample flips
    assert monte_carlo["p_value"] == pytest.approx(exact, abs=0.02)
    assert "monte-carlo" in monte_carlo["test"]
    assert paired_test(a, a)["p_value"] == 1.0
    strong = paired_test([1.0] * 40, [0.0] * 40)
    assert strong["difference"] == 1.0 and strong["p_value"] < 1e-3


def test_benchmark_metrics_from_samples():
    def sample(pid, idx, ok, answer, tokens=10, finish="stop", fmt=True):
        return Sample(pid, idx, ok, answer, tokens, finish, fmt, "correct" if ok else "wrong")

    samples = [
        sample("a", 0, True, "1"), sample("a", 1, True, "1"), sample("a", 2, False, "2"), sample("a", 3, False, "3"),
        sample("b", 0, False, "9", 30, "length", False), sample("b", 1, False, "8"),
        sample("b", 2, False, None, 50, "length"), sample("b", 3, True, "5"),
    ]
    metrics = benchmark_metrics(samples, k=4)
    assert metrics["problems"] == 2 and metrics["complete"]
    assert not benchmark_metrics(samples, k=4, expected_problems=3)["complete"]  # a problem never sampled
    assert not benchmark_metrics(samples[:-1], k=4)["complete"]
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert metrics["cons@k"] == pytest.approx((1.0 + 1 / 3) / 2)  # b: three-way tie 9/8/5, one right
    assert metrics["pass_at"]["2"] == pytest.approx((brute_pass_at_k(4, 2, 2) + brute_pass_at_k(4, 1, 2)) / 2)
    assert metrics["pass@k"] == 1.0
    assert metrics["truncation_rate"] == 2 / 8 and metrics["format_failure_rate"] == 1 / 8
    assert metrics["response_tokens_mean"] == pytest.approx((6 * 10 + 30 + 50) / 8)
    assert metrics["response_tokens_median"] == 10
    assert metrics["verdicts"] == {"correct": 3, "wrong": 5}

"""The arithmetic of evaluation scores: exactly one copy, used by `distill eval` and `distill compare`.

Per benchmark, from k graded samples of each of N problems:

- pass@1: for each problem the fraction of its samples that are correct, averaged over problems
  (the DeepSeek-R1 paper's pass@1 with k samples at temperature 0.6).
- pass@k (unbiased): Chen et al. 2021, `1 - C(n-c, k) / C(n, k)` per problem with n samples and c
  correct, averaged; computed as a product so large n does not overflow. Reported at k = 1, 2, 4,
  ... and at the full k.
- cons@k: majority vote over the extracted answers of a problem's samples. Answers are grouped by
  their text with whitespace and surrounding `$` removed; `distill eval` first replaces each
  answer by the first equivalent one of its problem (`distill.evaluate.vote_by_equivalence`, the
  verifier's equivalence), so `1/2`, `0.5` and `\\frac{1}{2}` are one vote. Samples with no
  extracted answer do not vote; a problem with no votes scores 0. **Tie rule:** when several
  answers share the top count, the problem scores the fraction of them that are correct, i.e. the
  expected score of a uniformly random tie-break. This is deterministic and does not depend on
  sample order (first-seen tie-breaks, as `Counter.most_common` gives, do).
- standard error: of the mean of the per-problem scores, `std(ddof=1) / sqrt(N)`: the error from
  the finite problem set, which is what decides whether two models differ.
- 95% confidence interval: percentile bootstrap over problems (10,000 resamples, fixed seed, so
  a rescore reproduces it exactly).
- paired significance test (compare): two models on the same problems; the per-problem score
  differences are tested with a sign-flip permutation test (two-sided; exact enumeration up to 16
  non-zero differences, else 10,000 random flips with the +1 correction), and the difference
  gets a paired bootstrap 95% CI.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
PERMUTATION_SAMPLES = 10_000
EXACT_PERMUTATION_MAX = 16  # 2^16 sign patterns: exact enumeration stays cheap


@dataclass(frozen=True)
class Sample:
    """What scoring needs of one graded generation."""

    problem_id: str
    sample_idx: int
    correct: bool | None  # None: the verifier could not decide (timeout, bad reference); scored as wrong
    extracted: str | None  # the extracted final answer, None when there was none
    completion_tokens: int
    finish_reason: str
    format_ok: bool
    reason: str = ""  # the verdict's reason: correct | wrong | no_answer | bad_reference | timeout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples drawn without replacement from n (of
    which c are correct) is correct."""
    assert 0 <= c <= n and 1 <= k <= n, f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})"
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def normalize_answer(answer: str) -> str:
    return re.sub(r"\s+", "", answer).strip("$")


def majority_vote(extracted: Sequence[str | None], correct: Sequence[bool | None]) -> tuple[float, list[str]]:
    """(cons score of one problem, the top answers). See the module docstring for the tie rule."""
    assert len(extracted) == len(correct), "one correctness per extracted answer"
    votes: Counter[str] = Counter()
    right: dict[str, bool] = {}
    for answer, ok in zip(extracted, correct):
        if answer is None or not normalize_answer(answer):
            continue
        key = normalize_answer(answer)
        votes[key] += 1
        # Samples with the same answer text were graded against the same reference; if the
        # verifier timed out on one of them, a correct verdict on another decides.
        right[key] = right.get(key, False) or bool(ok)
    if not votes:
        return 0.0, []
    top = max(votes.values())
    winners = [answer for answer, count in votes.items() if count == top]
    return sum(right[w] for w in winners) / len(winners), winners


def standard_error(scores: Sequence[float]) -> float:
    if len(scores) < 2:
        return float("nan")
    return float(np.std(np.asarray(scores, dtype=float), ddof=1) / math.sqrt(len(scores)))


def bootstrap_ci(
    scores: Sequence[float], level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling problems with replacement."""
    values = np.asarray(scores, dtype=float)  # (N,)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    chunk = max(1, 2_000_000 // values.size)  # bound memory: (chunk, N) indices at a time
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        index = rng.integers(0, values.size, size=(stop - start, values.size))  # (chunk, N)
        means[start:stop] = values[index].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_test(
    scores: Sequence[float],
    baseline: Sequence[float],
    samples: int = PERMUTATION_SAMPLES,
    seed: int = 0,
    exact_max: int = EXACT_PERMUTATION_MAX,
) -> dict[str, Any]:
    """Difference of means between two models scored on the same problems (same order), its
    paired bootstrap 95% CI and a two-sided sign-flip permutation p-value."""
    a = np.asarray(scores, dtype=float)
    b = np.asarray(baseline, dtype=float)
    assert a.shape == b.shape, f"paired scores need the same problems ({a.shape} vs {b.shape})"
    differences = a - b  # (N,)
    observed = abs(differences.mean()) if differences.size else 0.0
    nonzero = differences[differences != 0.0]  # zero differences do not change under a flip
    tolerance = 1e-12
    if nonzero.size == 0:
        p_value, method = 1.0, "exact"
    elif nonzero.size <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=nonzero.size)))  # (2^m, m)
        flipped = np.abs((signs * nonzero).sum(axis=1)) / differences.size
        p_value, method = float(np.mean(flipped >= observed - tolerance)), "exact"
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(samples, nonzero.size))  # (B, m)
        flipped = np.abs((signs * nonzero).sum(axis=1)) / differences.size
        p_value = float((1 + np.sum(flipped >= observed - tolerance)) / (samples + 1))
        method = "monte-carlo"
    low, high = bootstrap_ci(differences, seed=seed)
    return {
        "difference": float(differences.mean()) if differences.size else 0.0,
        "ci95": [low, high],
        "p_value": p_value,
        "test": f"paired sign-flip permutation ({method})",
        "problems": int(differences.size),
    }


def exact_sign_flip_p(differences: Sequence[float]) -> float:
    """Brute force: every one of the 2^N sign patterns (tests check `paired_test` against it)."""
    values = list(differences)
    observed = abs(sum(values) / len(values))
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(values)):
        total += 1
        hits += abs(sum(s * v for s, v in zip(signs, values)) / len(values)) >= observed - 1e-12
    return hits / total


def group_by_problem(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples per problem id, each list in sample order; problem order is first appearance."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.problem_id, []).append(sample)
    for group in groups.values():
        group.sort(key=lambda s: s.sample_idx)
    return groups


def per_problem_scores(samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
    """problem id -> {"pass@1": fraction correct, "cons": majority-vote score, "n", "c"}."""
    scores = {}
    for problem_id, group in group_by_problem(samples).items():
        correct = [bool(s.correct) for s in group]
        cons, _ = majority_vote([s.extracted for s in group], [s.correct for s in group])
        scores[problem_id] = {"pass@1": sum(correct) / len(group), "cons": cons, "n": len(group), "c": sum(correct)}
    return scores


def benchmark_metrics(samples: Sequence[Sample], k: int, seed: int = 0, expected_problems: int | None = None) -> dict[str, Any]:
    """Every figure of one benchmark, from its graded samples (k per problem when complete).
    Problems without any sample are not scored; `complete` says whether all were."""
    scores = per_problem_scores(samples)
    if not scores:
        return {"problems": 0, "samples": 0, "k": k, "complete": False}
    pass1 = [s["pass@1"] for s in scores.values()]
    cons = [s["cons"] for s in scores.values()]
    smallest_n = min(int(s["n"]) for s in scores.values())
    ks = sorted({2**i for i in range(0, int(math.log2(smallest_n)) + 1)} | {smallest_n})
    pass_at = {str(j): float(np.mean([pass_at_k(int(s["n"]), int(s["c"]), j) for s in scores.values()])) for j in ks}
    lengths = [s.completion_tokens for s in samples]
    reasons = Counter(s.reason or ("correct" if s.correct else "wrong") for s in samples)
    return {
        "problems": len(scores),
        "samples": len(samples),
        "k": k,
        "complete": all(int(s["n"]) >= k for s in scores.values()) and len(scores) >= (expected_problems or 0),
        "pass@1": float(np.mean(pass1)),
        "pass@1_se": standard_error(pass1),
        "pass@1_ci95": list(bootstrap_ci(pass1, seed=seed)),
        "cons@k": float(np.mean(cons)),
        "cons@k_se": standard_error(cons),
        "cons@k_ci95": list(bootstrap_ci(cons, seed=seed)),
        "pass@k": pass_at[str(smallest_n)],
        "pass_at": pass_at,
        "response_tokens_mean": float(np.mean(lengths)),
        "response_tokens_median": float(statistics.median(lengths)),
        "truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "format_failure_rate": sum(not s.format_ok for s in samples) / len(samples),
        "verdicts": dict(sorted(reasons.items())),
    }

"""The peers' labelled grading cases (tests/data/peer_cases.jsonl) and the graders measured on
them, side by side in one run: distill's Verifier, math-verify called plainly, and math-verify
called as each peer's own test calls it. Used by tests/test_verify.py and
bench/verify_agreement.py (which writes the table into docs/benchmarks.md).

A case is (gold, pred, label) plus the options its test passes: `precision` (math-verify's
`float_rounding`), `strict`, `allow_set_relation_comp`, `match_types` (extraction targets) and
`language`. Sources and licences: tests/data/PEER_CASES.md.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

CASES_FILE = Path(__file__).parent / "data" / "peer_cases.jsonl"


def load_cases() -> list[dict]:
    return [json.loads(line) for line in CASES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def _verify_options(case: dict) -> dict:
    return {"float_rounding": case["precision"], "strict": case["strict"], "allow_set_relation_comp": case["allow_set_relation_comp"]}


def math_verify_plain(case: dict) -> bool:
    """`verify(parse(gold), parse(pred))`: math-verify's default extraction on both sides, with
    the test's comparison options (precision, strict, set relations)."""
    from math_verify import parse, verify

    if case["gold"] is None or case["pred"] is None:
        return False
    return bool(verify(parse(case["gold"]), parse(case["pred"]), **_verify_options(case)))


def math_verify_as_tested(case: dict) -> bool:
    """math-verify with the extraction targets the peer's test uses: Math-Verify's
    `compare_strings` (`LatexExtractionConfig(boxed_match_priority=0)` and/or
    `ExprExtractionConfig()` on both sides); lighteval's `compare_strings` (the same targets with
    lighteval's defaults; its language-specific anchors are not reproduced); NeMo-Skills'
    `math_equal` (both sides wrapped in `$...$`, `LatexExtractionConfig()`; its literal and
    multiple-choice shortcuts are not reproduced)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold, pred = case["gold"], case["pred"]
    if gold is None or pred is None:
        return False
    kinds = case["match_types"]
    if kinds == ["default"]:
        return math_verify_plain(case)
    if kinds == ["nemo_math_equal"]:
        wrap = lambda text: text if any(m in text for m in ("$", "\\(", "\\[", "\\boxed{")) else f"${text}$"  # noqa: E731
        targets = [LatexExtractionConfig()]
        return bool(verify(parse(wrap(gold), targets), parse(wrap(pred), targets), **_verify_options(case)))
    priority = 0 if "Math-Verify" in case["source"] else 50
    targets = [LatexExtractionConfig(boxed_match_priority=priority) if kind == "latex" else ExprExtractionConfig() for kind in kinds]
    return bool(verify(parse(gold, targets), parse(pred, targets), **_verify_options(case)))


def distill_verdicts(cases: list[dict], no_answer_fallback: str, workers: int = 2) -> list:
    """distill's Verifier on every case: the gold as the reference, the prediction as a
    completion (without think tags: the whole text is the final part); one Verifier per set of
    comparison options."""
    from distill.verify import Verifier

    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, case in enumerate(cases):
        groups[(case["precision"], case["strict"], case["allow_set_relation_comp"])].append(index)
    verdicts: list = [None] * len(cases)
    for (precision, strict, set_relation), indices in groups.items():
        with Verifier(workers=workers if len(indices) > 20 else 1, precision=precision, strict=strict, allow_set_relation_comp=set_relation,
                      no_answer_fallback=no_answer_fallback) as verifier:
            graded = verifier.grade([(cases[i]["gold"], cases[i]["pred"] or "") for i in indices])
        for index, verdict in zip(indices, graded):
            verdicts[index] = verdict
    return verdicts


def measure(cases: list[dict], no_answer_fallback: str = "last", as_tested: bool = True) -> dict:
    """Every grader on every case, in this run: per grader, the cases it gets right, its false
    positives (credits a pair labelled unequal) and false negatives."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    results = {}
    if as_tested:
        results["math-verify, as each peer's test calls it"] = [math_verify_as_tested(c) for c in cases]
    results["math-verify, plain defaults"] = [math_verify_plain(c) for c in cases]
    results[f"distill Verifier (no_answer_fallback={no_answer_fallback})"] = [
        v.correct is True for v in distill_verdicts(cases, no_answer_fallback)
    ]
    table = {}
    for grader, credited in results.items():
        table[grader] = {
            "agree": sum(c == case["label"] for c, case in zip(credited, cases)),
            "false_positive": [i for i, (c, case) in enumerate(zip(credited, cases)) if c and not case["label"]],
            "false_negative": [i for i, (c, case) in enumerate(zip(credited, cases)) if not c and case["label"]],
            "credited": credited,
        }
    return table

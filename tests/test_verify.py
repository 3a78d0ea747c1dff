"""The shared verifier: extraction, equivalence, the hard time limit, and agreement with the
recorded verdicts of real long-CoT outputs."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import shared_path
from distill.verify import (
    Verdict,
    Verifier,
    check_format,
    check_language,
    check_repetition,
    extract_answer,
    reference_answer,
)
from distill.verify.equivalence import check, quick_verdict
from distill.verify.pool import HardLimitPool

LIMIT_S = 1.0  # the hard limit of the verifier that meets adversarial input
SLACK_S = 1.0  # how much later than the limit a check may end (process kill + scheduling on a busy machine)


@pytest.fixture(scope="module")
def verifier():
    """For exact verdicts: the default limit, so a loaded machine does not turn them into timeouts."""
    with Verifier(workers=2) as shared:
        yield shared


@pytest.fixture(scope="module")
def strict():
    """For adversarial and fuzzed input, where a timeout is an acceptable verdict."""
    with Verifier(workers=2, timeout_s=LIMIT_S) as shared:
        yield shared


def think(answer_text: str, reasoning: str = "Let me work it out.") -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer_text}"


# --------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        (think("So the answer is \\boxed{42}."), "42"),
        (think("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}"),
        (think("first \\boxed{1}, finally \\boxed{2}"), "2"),  # the last box
        (think("\\fbox{7}"), "7"),
        (think("\\boxed{\\{1, 2\\}}"), "\\{1, 2\\}"),  # escaped braces do not count
        (think("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        (think("$\\boxed{x^{2}+1}$"), "x^{2}+1"),
        (think("\\boxed 5"), "5"),
        (think("\\boxed{3} and then \\boxed{4"), "3"),  # an unbalanced last box is passed over
        (think("The final answer is $\\frac{3}{4}$."), "\\frac{3}{4}"),
        (think("**Answer:** 1,000 apples"), "1,000"),
        (think("The answer is (C)."), "C"),
        (think("the answer is correct, so ... #### 72"), "72"),  # prose after 'answer is' is not an answer
        ("no thinking at all, the answer is \\boxed{9}", "9"),  # no think block: the whole text
        ("<think>I guess \\boxed{5} but let me check", None),  # thinking never ended
        (think("I am done.", reasoning="maybe \\boxed{5}"), None),  # a box in the reasoning does not count
        (think(""), None),
        (think("\\boxed{}"), None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_with_other_think_tags():
    completion = "<|begin_of_thought|>\nsurely \\boxed{1}\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\\boxed{2}\n<|end_of_solution|>"
    assert extract_answer(completion, think_end="<|end_of_thought|>", think_start="<|begin_of_thought|>") == "2"
    assert extract_answer(completion) == "2"  # no <think> tags: the whole text, whose last box is 2


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", "1072"),  # GSM8K
        ("So the area is $\\boxed{\\frac{9}{2}}$.", "\\frac{9}{2}"),  # a worked solution
        ("$27$", "27"),
        ("  ", None),
        (None, None),
    ],
)
def test_reference_answer(reference, expected):
    assert reference_answer(reference) == expected


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("<think>\nreasoning\n</think>\n\\boxed{1}", True),
        ("  <think>reasoning</think> final", True),
        ("<think>\n\n</think>\n\\boxed{1}", False),  # empty reasoning
        ("<think>reasoning</think>   ", False),  # nothing after the reasoning
        ("reasoning</think>\\boxed{1}", False),  # no opening tag
        ("<think>a</think><think>b</think>\\boxed{1}", False),  # two blocks
        ("preamble <think>a</think>\\boxed{1}", False),  # text before the block
        ("</think><think>a\\boxed{1}", False),  # wrong order
    ],
)
def test_check_format(completion, ok):
    assert check_format(completion) is ok


def test_check_format_custom_tags():
    tags = ("<|begin_of_thought|>", "<|end_of_thought|>")
    assert check_format("<|begin_of_thought|>x<|end_of_thought|>\n\\boxed{1}", tags)
    assert not check_format("<think>x</think>\n\\boxed{1}", tags)


# --------------------------------------------------------------------------------------------
# equivalence


TRUE_CASES = [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "\\dfrac{1}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("[1,2)", "[1, 2)"),
    ("(-\\infty, 3)", "(-\\infty,3)"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("10\\text{ cm}", "10"),  # units
    ("\\text{(C)}", "C"),  # choices
    ("90^\\circ", "90"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"),
    ("x^2+1", "1+x^2"),
    ("1000", "1,000"),
    ("5", "5.0"),
    ("007", "7"),
    ("\\$18", "18"),
]
FALSE_CASES = [
    ("5", "6"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("(1,2]", "[1,2]"),
    ("2", "2,3"),
    ("\\text{(A)}", "B"),
    ("\\pi", "3.14"),
    ("\\sqrt{2}", "2"),
    ("x+1", "x-1"),
]


def test_equivalence_hand_written_cases(verifier):
    items = [(ref, think(f"\\boxed{{{answer}}}")) for ref, answer in TRUE_CASES + FALSE_CASES]
    verdicts = verifier.grade(items)
    for (ref, answer), verdict in zip(TRUE_CASES, verdicts[: len(TRUE_CASES)]):
        assert verdict == Verdict(True, answer, "correct"), f"{ref} vs {answer}: {verdict}"
    for (ref, answer), verdict in zip(FALSE_CASES, verdicts[len(TRUE_CASES) :]):
        assert verdict == Verdict(False, answer, "wrong"), f"{ref} vs {answer}: {verdict}"


def test_reasons_no_answer_and_bad_reference(verifier):
    verdicts = verifier.grade([
        ("7", "<think>the answer is \\boxed{7}"),  # cut off inside the reasoning
        ("\\frac{1}{2}", think("I do not know.")),
        (None, think("\\boxed{7}")),
        ("", think("\\boxed{7}")),
        ("#### ", think("\\boxed{7}")),
    ])
    assert [v.reason for v in verdicts] == ["no_answer", "no_answer", "bad_reference", "bad_reference", "bad_reference"]
    assert [v.correct for v in verdicts] == [False, False, None, None, None]  # a bad reference is never "wrong"


def test_gsm8k_reference_and_order_kept(verifier):
    gsm8k = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 18"
    verdicts = verifier.grade([(gsm8k, think("\\boxed{18}")), (gsm8k, think("\\boxed{9}")), ("\\frac{2}{3}", think("\\boxed{4/6}"))])
    assert [v.correct for v in verdicts] == [True, False, True]


def test_equal_compares_final_answers(verifier):
    assert verifier.equal([("\\frac{1}{2}", "0.5"), ("x^2-1", "(x-1)(x+1)"), ("3", "4"), ("[1,2)", "[1,2]")]) == [True, True, False, False]


def test_cache_by_reference_and_answer(verifier):
    item = ("x^2 - 1", think("\\boxed{(x-1)(x+1)}", reasoning="one way"))
    same_answer = ("x^2 - 1", think("\\boxed{(x-1)(x+1)}", reasoning="another way"))
    checked = verifier.stats["checked"]
    assert verifier.grade([item]) == [Verdict(True, "(x-1)(x+1)", "correct")]
    assert verifier.stats["checked"] == checked + 1
    cached = verifier.stats["cached"]
    assert verifier.grade([same_answer, item]) == [Verdict(True, "(x-1)(x+1)", "correct")] * 2
    assert verifier.stats["checked"] == checked + 1, "a repeated (reference, answer) pair must not be checked again"
    assert verifier.stats["cached"] == cached + 2


def _number(numerator: int, denominator: int, form: str) -> str:
    if form == "int" and numerator % denominator == 0:
        return str(numerator // denominator)
    if form == "decimal":
        return repr(round(numerator / denominator, 3))
    sign = "-" if numerator < 0 else ""
    if form == "slash":
        return f"{numerator}/{denominator}"
    return f"{sign}\\{form}{{{abs(numerator)}}}{{{denominator}}}"


FORMS = st.sampled_from(["int", "frac", "dfrac", "slash", "decimal"])


@settings(max_examples=50, deadline=None)
@given(a=st.integers(-40, 40), b=st.integers(1, 9), c=st.integers(-40, 40), d=st.integers(1, 9), form_a=FORMS, form_b=FORMS)
def test_quick_verdicts_agree_with_math_verify(a, b, c, d, form_a, form_b):
    """The parent-side shortcut (no sympy) decides only where math-verify says the same."""
    reference, answer = _number(a, b, form_a), _number(c, d, form_b)
    quick = quick_verdict(reference, answer)
    if quick is not None:
        assert quick == check(reference, answer), f"{reference} vs {answer}"


def test_quick_spacing_verdicts_agree_with_math_verify():
    references = [json.loads(line)["answer"] for line in shared_path("eval/math500/test.jsonl").read_text().splitlines()]
    decided = 0
    for reference in references[::12]:
        spaced = reference.replace("+", " + ").replace(",", ",\\ ").replace("\\frac", "\\dfrac")
        if "\\left" not in reference:
            spaced = spaced.replace("(", "\\left( ").replace(")", " \\right)")
        quick = quick_verdict(reference, spaced)
        if quick is not None and spaced != reference:
            decided += 1
            assert quick == check(reference, spaced) == (True, "correct"), f"{reference} vs {spaced}"
    assert decided >= 3


# --------------------------------------------------------------------------------------------
# the hard limit


ADVERSARIAL = [
    ("5", "10^{10^{10^{10}}}"),
    ("10^{10^{10^{10}}}", "10^{10^{10^{11}}}"),
    ("\\frac{1}{3}", "{" * 5000 + "1" + "}" * 5000),  # deeply nested braces
    ("\\frac{1}{3}", "\\frac{" * 2000 + "1" + "}{2}" * 2000),
    ("1", "1+" * 50_000 + "1"),  # a 100k-character answer
    ("x", "(" * 3000 + "x" + ")" * 3000),
]


def test_adversarial_answers_end_within_the_limit(strict):
    items = [(ref, think(f"\\boxed{{{answer}}}")) for ref, answer in ADVERSARIAL]
    started = time.monotonic()
    verdicts = strict.grade(items)
    elapsed = time.monotonic() - started
    assert len(verdicts) == len(items)
    assert all(v.reason in ("correct", "wrong", "timeout") for v in verdicts), verdicts
    assert verdicts[0].correct is not True  # 10^10^10^10 is not 5, whatever happens
    # Two workers, each check under the limit, a timed-out one run once more: the whole batch
    # within (checks + timeouts) / 2 limits (+ slack).
    timeouts = sum(v.reason == "timeout" for v in verdicts)
    assert elapsed <= (len(items) + timeouts) / 2 * LIMIT_S + SLACK_S * 2, f"adversarial batch took {elapsed:.1f}s"
    assert max(strict.latencies[-len(items):]) <= LIMIT_S + SLACK_S
    # The pool is whole afterwards: a plain check still works.
    assert strict.grade_one("\\frac{1}{2}", think("\\boxed{0.5}")).reason in ("correct", "timeout")
    assert all(worker.process.is_alive() for worker in strict._pool.workers)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    reference=st.text(alphabet="0123456789x+-*/^{}()[]\\,.= fracsqtbox", max_size=30),
    answer=st.text(alphabet="0123456789x+-*/^{}()[]\\,.= fracsqtbox$", max_size=60),
    noise=st.text(max_size=80),
)
def test_fuzzed_inputs_always_get_a_verdict(strict, reference, answer, noise):
    completion = f"<think>{noise}</think>\\boxed{{{answer}}} {noise}"
    started = time.monotonic()
    verdict = strict.grade_one(reference, completion)
    assert time.monotonic() - started <= 2 * LIMIT_S + SLACK_S  # a timed-out check is run twice
    assert verdict.reason in ("correct", "wrong", "no_answer", "bad_reference", "timeout")
    assert (verdict.correct is None) == (verdict.reason in ("bad_reference", "timeout"))


@settings(max_examples=60, deadline=None)
@given(
    answer=st.text(alphabet=st.characters(blacklist_characters="{}\\$", blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip() and not s.strip().endswith(".")),
    reasoning=st.text(max_size=200).filter(lambda s: "</think>" not in s and "<think>" not in s),
)
def test_extraction_finds_the_boxed_answer_after_any_reasoning(answer, reasoning):
    completion = f"<think>{reasoning} \\boxed{{decoy}}</think>\nSo: \\boxed{{{answer}}}"
    assert extract_answer(completion) == answer.strip()


def test_pool_kills_a_stuck_worker_and_replaces_it():
    pool = HardLimitPool("pool_tasks:stubborn_sleep", workers=2, timeout_s=0.5)
    try:
        started = time.monotonic()
        outcomes = pool.run([(30.0,), (0.01,), (0.01,), (30.0,), (0.01,)])
        elapsed = time.monotonic() - started
        assert [o.status for o in outcomes] == ["timeout", "ok", "ok", "timeout", "ok"]
        assert outcomes[1].value == 0.01
        assert pool.restarts == 2
        assert max(o.seconds for o in outcomes) <= 0.5 + SLACK_S
        assert elapsed < 10, f"took {elapsed:.1f}s: a stuck task held the pool up (each sleeps 30 s)"
    finally:
        pool.close()


def test_pool_survives_a_crashing_worker():
    pool = HardLimitPool("pool_tasks:exit_now", workers=1, timeout_s=5.0)
    try:
        outcomes = pool.run([(3,)])
        assert outcomes[0].status == "crashed"
        assert pool.restarts == 1
    finally:
        pool.close()


# --------------------------------------------------------------------------------------------
# real long-CoT outputs (Sky-T1 format), against their recorded verdicts


def test_agreement_with_recorded_verdicts_on_real_traces(verifier):
    rows = []
    for name in ("sky-t1-math-correct-5k-32b_aime24.jsonl", "sky-t1-math-correct-5k-27b_math500.jsonl"):
        rows += [json.loads(line) for line in shared_path(f"traces/{name}").read_text().splitlines()]
    tags = ("<|begin_of_thought|>", "<|end_of_thought|>")
    with Verifier(workers=2, timeout_s=5.0, think_tags=tags) as sky:
        verdicts = sky.grade([(row["answer"], row["code"][0]) for row in rows])
    recorded = [row["score"][0] for row in rows]
    decided = [(v.correct, r) for v, r in zip(verdicts, recorded) if v.reason in ("correct", "wrong")]
    agreement = sum(ours == theirs for ours, theirs in decided) / len(decided)
    # Where we find an answer we agree with the recorded verdicts on 97% (see docs/filter.md:
    # the disagreements are mostly the recorded evaluator's extraction errors).
    # (issue 13: 261 of 269 on 2026-12-01; the extraction changes must not lower it)
    assert len(decided) >= 269
    assert agreement >= 0.97, f"agreement {agreement:.3f} on {len(decided)} decided traces"
    assert not any(v.reason == "timeout" for v in verdicts)
    # Traces that never finish their reasoning are never credited, whatever the recorded score.
    for row, verdict in zip(rows, verdicts):
        if "<|begin_of_thought|>" in row["code"][0] and "<|end_of_thought|>" not in row["code"][0]:
            assert verdict.correct is not True


# --------------------------------------------------------------------------------------------
# language and repetition


def test_language_check():
    problem = "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b$."
    english = "<think>We need b+7 to divide 9b+7, so b+7 divides 56.</think>\\boxed{70}"
    mixed = "<think>We need b+7 to divide 9b+7. 所以我们需要找到所有满足条件的整数底数并求和计算结果。</think>\\boxed{70}"
    assert check_language(problem, english).ok
    result = check_language(problem, mixed)
    assert not result.ok and result.longest_foreign_run > 20
    assert check_language("求 $1+1$ 的值。", "<think>我们计算 1+1=2。</think>\\boxed{2}").ok
    # A few foreign letters under the thresholds pass (a name, a quoted symbol).
    assert check_language(problem, english * 20 + " (see 数学)", max_foreign_fraction=0.01, max_foreign_run=20).ok
    # Greek letters are mathematics, not a language.
    assert check_language(problem, "<think>Let α = β + γ and θ = π/2.</think>\\boxed{70}").ok


def test_repetition_check():
    normal = " ".join(f"Step {i}: we add {i} and {i + 1} to get {2 * i + 1}." for i in range(200))
    loop = normal[:2000] + " Wait, let me recompute the sum of the first terms again carefully." * 60
    assert check_repetition(normal).ok
    looped = check_repetition(loop)
    assert not looped.ok and looped.max_repeats > 10
    assert not check_repetition("1" * 20_000).ok  # a run of one character is a loop too
    assert check_repetition("short").ok


def test_repetition_defaults_on_real_traces():
    rows = [json.loads(line) for line in shared_path("traces/sky-t1-math-correct-5k-27b_math500.jsonl").read_text().splitlines()]
    finished = [row["code"][0] for row in rows if "<|end_of_solution|>" in row["code"][0]]
    cut_off = [row["code"][0] for row in rows if "<|end_of_solution|>" not in row["code"][0]]
    assert all(check_repetition(text).ok for text in finished)  # no false alarm on a finished trace
    looping = [text for text in cut_off if not check_repetition(text).ok]
    assert len(looping) >= 12  # outputs that ran into max tokens in a loop (14 of the 321 cut off)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab c\n", max_size=300), window=st.integers(1, 25))
def test_repetition_counts_match_brute_force(text, window):
    from collections import Counter

    flat = " ".join(text.split())
    expected = max(Counter(flat[i : i + window] for i in range(len(flat) - window + 1)).values()) if len(flat) >= window else (1 if flat else 0)
    assert check_repetition(text, window, 10**9).max_repeats == expected



# --------------------------------------------------------------------------------------------
# issue 13: what math-verify gets right, the peers' labelled cases, options, cons@k by equivalence


@pytest.mark.parametrize(
    "completion, expected",
    [
        # several boxes that together are the answer; a box repeated counts once
        (think("The pairs are \\boxed{(2,2)} and \\boxed{(6,2)}."), "(2,2), (6,2)"),
        (think("The integers are \\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}."), "-2, 1"),
        (think("$\\boxed{1}$, $\\boxed{2}$ or $\\boxed{3}$"), "1, 2, 3"),
        (think("\\boxed{7} ... so again \\boxed{7}"), "7"),
        (think("\\boxed{3} is wrong, so \\boxed{5}"), "5"),  # words between: the earlier box is a draft
        # "Final Answer:" lines: the nested phrase, and the answer of a sentence
        (think("Final Answer: The final answer is 7.78. I hope it is correct."), "7.78"),
        (think("Final Answer: The largest $n$ is 34."), "34"),
        (think("**Final Answer:**\n$\\frac{1}{2}$"), "\\frac{1}{2}"),
        (think("Answer $ 9 $"), "9"),
        # without think tags the later statement wins over an intermediate box
        ("We first get \\boxed{3} for part one. Combining, the answer is 12.", "12"),
        ("The answer is 12, as the check \\boxed{12} confirms.", "12"),
        (think("Therefore $x \\geq 5$ is the solution."), None),  # no answer statement: the default gives none
    ],
)
def test_extract_answer_several_boxes_and_phrases(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Therefore $x \\geq 5$ is the solution.", "x \\geq 5"),
        ("so the total is 1,000.99€ in the end", "1,000.99"),
        ("\\frac{10}{9}", "\\frac{10}{9}"),  # only mathematics: the whole text
        ("x^2 + 2*x + 1", "x^2 + 2*x + 1"),
        ("所以一共有3 + 10 = 13只鸟。", "13"),
        ("每份应该是 (\\frac{2}{5}) 吨。", "\\frac{2}{5}"),  # not the 5 inside the fraction
        ("AZYUK2A", None),  # a digit inside a word is not a number
        ("Answer $ \n 9 \n $", None),  # an inline formula broken over lines is not read
        ("I do not know.", None),
    ],
)
def test_no_answer_fallback_last(text, expected):
    assert extract_answer(text, fallback="last") == expected
    if expected is not None and "$" in text:
        assert extract_answer(text) is None  # the default ("none") gives no answer


def test_reference_with_several_boxes_and_sentences():
    assert reference_answer("so $n = \\(\\boxed{1}\\) and \\(\\boxed{-2}\\)") == "1, -2"
    assert reference_answer("$\\boxed{1}\\boxed{2}$") == "1, 2"
    assert reference_answer("Hence the answer is $28\\%$. Final Answer: The final answer is $28 \\%$. I hope it is correct.") == "28 \\%"
    assert reference_answer("\\boxed{1} papers and \\boxed{2} bins") == "1, 2"


def test_several_boxes_graded_as_one_answer(verifier):
    reference = "so the solutions are $n = \\boxed{1}$ and $\\boxed{-2}$"
    verdicts = verifier.grade([
        (reference, think("The integers are \\boxed{-2} and \\boxed{1}.")),
        (reference, think("\\boxed{-2}")),  # half the answer
        ("(2,2),(6,2)", think("\\boxed{(2,2)} and \\boxed{(6,2)}")),
        ("5", think("\\boxed{3} and \\boxed{5}")),  # two answers boxed for one
    ])
    assert [v.correct for v in verdicts] == [True, False, True, False], verdicts


def test_verifier_options(verifier):
    assert verifier.grade_one("1000.99", "1000,99").correct is False  # no fallback: no answer
    with Verifier(workers=1, no_answer_fallback="last") as loose:
        assert loose.grade_one("1000.99", "the price is 1000,99 €").correct is True  # decimal comma
        assert loose.grade_one("1,22", "\\boxed{1.22}").correct is True
        assert loose.grade_one("2", "\\boxed{2,3}").correct is False
    with Verifier(workers=1, no_answer_fallback="last", decimal_comma=False) as english:
        assert english.grade_one("1000.99", "\\boxed{1000,99}").correct is False
    with Verifier(workers=1, precision=2) as coarse:
        assert coarse.grade_one("\\frac{1}{3}", "\\boxed{0.333}").correct is True
    assert verifier.grade_one("\\frac{1}{3}", "\\boxed{0.333}").correct is False  # 6 decimals by default
    with Verifier(workers=1, allow_set_relation_comp=True) as relations:
        assert relations.grade_one("x \\in [-2,7]", "\\boxed{-2 \\le x \\le 7}").correct is True
    assert verifier.grade_one("x \\in [-2,7]", "\\boxed{-2 \\le x \\le 7}").correct is False
    with pytest.raises(ValueError, match="no_answer_fallback"):
        Verifier(no_answer_fallback="last_number")


def test_peer_labelled_cases_against_math_verify():
    """The peers' own labelled cases (tests/data/peer_cases.jsonl: Math-Verify, NeMo-Skills,
    lighteval; sources in tests/data/PEER_CASES.md), graded by distill and by math-verify in this
    run: distill agrees with the labels at least as often as math-verify called plainly, and
    never credits a pair the peer labels unequal. Measured with eval's fallback ("last"); the
    filter's and grpo's ("none") extract the same answer or none, so it credits a subset of
    these pairs and has no false positive either (checked below: the fallback only adds answers
    where there were none)."""
    from peer_cases import load_cases, measure

    cases = load_cases()
    assert len(cases) >= 300
    table = measure(cases, no_answer_fallback="last", as_tested=False)  # distill eval's default
    plain = table["math-verify, plain defaults"]
    ours = table["distill Verifier (no_answer_fallback=last)"]
    wrongly_credited = [cases[i]["source"] + f" {cases[i]['gold']!r} vs {cases[i]['pred']!r}" for i in ours["false_positive"]]
    assert not wrongly_credited, wrongly_credited
    assert ours["agree"] >= plain["agree"], f"distill {ours['agree']} vs math-verify {plain['agree']} of {len(cases)}"
    for case in cases:
        strict_answer = extract_answer(case["pred"] or "")
        assert strict_answer is None or strict_answer == extract_answer(case["pred"] or "", fallback="last")


def test_timeout_is_retried_once(tmp_path):
    class SlowOnce(Verifier):
        _task = "pool_tasks:slow_once"

    class AlwaysSlow(Verifier):
        _task = "pool_tasks:always_slow"

    with SlowOnce(workers=1, timeout_s=0.5) as verifier:
        verdict = verifier.grade_one("x+1", think(f"\\boxed{{{tmp_path / 'marker'}}}"))
        assert verdict.reason == "correct", "a check that overran once is run again"
        assert verifier.stats["retried"] == 1 and verifier.stats["timeout"] == 0
    with AlwaysSlow(workers=1, timeout_s=0.5) as verifier:
        assert verifier.grade_one("x+1", think("\\boxed{y}")).reason == "timeout"
        assert verifier.stats["checked"] == 2 and verifier.stats["timeout"] == 1
        assert verifier.grade_one("x+1", think("\\boxed{y}")).reason == "timeout"
        assert verifier.stats["checked"] == 2, "after its second overrun the verdict stays (cached)"


def test_worker_start_up_failure_says_what_to_do(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from distill.verify import Verifier\nv = Verifier(workers=1)\nv.grade_one('x^2-1', '\\\\boxed{(x-1)(x+1)}')\n")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr.splitlines()[-1], result.stderr[-2000:]


def test_group_and_cons_at_k_by_equivalence(verifier):
    from distill.evaluate import vote_by_equivalence
    from distill.metrics import Sample, benchmark_metrics

    assert verifier.group(["1/2", "0.5", "\\frac{1}{2}", "3", None, "3", "x+1", "1+x"]) == [0, 0, 0, 3, None, 3, 6, 6]
    answers = ["1/2", "0.5", "\\frac{1}{2}", "3", "3"]  # by text "3" wins 2 to 1; by value 1/2 wins 3 to 2
    samples = [Sample("p", i, a != "3", a, 10, "stop", True) for i, a in enumerate(answers)]
    assert benchmark_metrics(samples, k=5)["cons@k"] == 0.0
    assert benchmark_metrics(vote_by_equivalence(samples, verifier), k=5)["cons@k"] == 1.0


def test_no_answer_fallback_defaults_per_stage():
    """One verifier, one option, a default per stage (the reasons are next to each config field
    and in docs/filter.md): filter and grpo credit only stated answers, eval grades unboxed ones."""
    from distill.evaluate import EvalConfig
    from distill.students.grpo import GRPOConfig
    from distill.teacher.filter import FilterConfig

    import dataclasses

    def default(config) -> str:
        return next(f.default for f in dataclasses.fields(config) if f.name == "no_answer_fallback")

    assert default(FilterConfig) == "none"
    assert default(GRPOConfig) == "none"
    assert default(EvalConfig) == "last"


@pytest.mark.parametrize(
    "text",
    [
        "\\(" * 50_000,  # openers never closed: a regex per span would rescan the rest from each
        "\\[" * 50_000,
        "$" + "a\n" * 50_000,
        "the answer is \\(" * 10_000,
        "answer: x is " * 10_000,
        "\\boxed{1} and " * 10_000,
        "\\boxed{" * 50_000,
        "\\boxed 1 " * 30_000,
        "$ \n $ " * 20_000,
    ],
    ids=lambda text: repr(text[:16]),
)
def test_extraction_is_linear_on_degenerate_text(text):
    """Extraction runs in the calling process, outside the hard limit: it must stay linear. Each of
    these took 10-30 s with per-span regexes (quadratic); linear work takes well under a second."""
    started = time.monotonic()
    extract_answer(text, fallback="last")
    reference_answer(text)
    assert time.monotonic() - started < 3.0

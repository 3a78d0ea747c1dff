"""Math equivalence of a reference answer and an extracted answer: math-verify, run inside a
worker process of `distill.verify.pool` (which enforces the hard wall-clock limit from outside).

Both sides are handed to math-verify the same way, wrapped as `\\boxed{...}`, so its LaTeX
normalisation (units, `\\text{}` choices, `\\dfrac`, degrees, percentages, `\\left( \\right)`)
applies equally to the reference and the answer; then `verify(gold, answer)` decides, with
math-verify's defaults (floats compared to 6 decimals, strict variables). math-verify's own
signal-based timeouts are switched off here: the pool's limit replaces them.

`quick_verdict` settles the cases that need no sympy in the parent process: identical strings
and two plain integers. Everything else goes to a worker.
"""

from __future__ import annotations

import logging
import re

_INTEGER = re.compile(r"[+-]?\d+")


def quick_verdict(reference: str, answer: str | None) -> tuple[bool | None, str] | None:
    """(correct, reason) when it is decidable without sympy, else None."""
    if _INTEGER.fullmatch(reference):
        if answer is None:
            return False, "no_answer"  # an integer reference always parses: no need to check it
        if _INTEGER.fullmatch(answer):
            same = int(reference) == int(answer)
            return same, "correct" if same else "wrong"
    if answer is not None and answer.strip() == reference.strip():
        return True, "correct"  # math-verify agrees with itself on every MATH-500 reference
    return None


def check(reference: str, answer: str | None) -> tuple[bool | None, str]:
    """(correct, reason): reason is "correct", "wrong", "no_answer" or "bad_reference".

    A reference math-verify cannot read at all is `bad_reference` (never a wrong answer); an
    answer it cannot read is `wrong`."""
    from math_verify import parse, verify

    gold = parse("\\boxed{" + reference + "}", parsing_timeout=None)
    if not gold:
        return None, "bad_reference"
    if answer is None:
        return False, "no_answer"
    predicted = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    if not predicted:
        return False, "wrong"
    same = bool(verify(gold, predicted, timeout_seconds=None))
    return same, "correct" if same else "wrong"


def warm_up() -> None:
    """Import math-verify and run one check, so a fresh worker's first real check is not slow
    (latex2sympy builds its parser on first use). Also silences math-verify's warning that its
    own timeout is off, which is on purpose here."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    check("\\frac{1}{2}", "0.5")

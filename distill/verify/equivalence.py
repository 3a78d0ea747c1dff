"""Math equivalence of a reference answer and an extracted answer: math-verify, run inside a
worker process of `distill.verify.pool` (which enforces the hard wall-clock limit from outside).

Both sides are handed to math-verify the same way, wrapped as `\\boxed{...}`, so its LaTeX
normalisation (units, `\\text{}` choices, `\\dfrac`, degrees, percentages, `\\left( \\right)`)
applies equally to the reference and the answer; then `verify(gold, answer)` decides, with
math-verify's defaults (floats compared to 6 decimals, strict variables). math-verify's own
signal-based timeouts are switched off here: the pool's limit replaces them.

`quick_verdict` settles the cases that need no sympy in the parent process: the same text up to
LaTeX spacing, and plain numbers (integers, fractions, decimals). Everything else goes to a
worker.
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction

_INTEGER = re.compile(r"[+-]?\d+")
_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{(\d+)\}|([+-]?\d+)/(\d+)")
_DECIMAL = re.compile(r"[+-]?\d*\.\d+|[+-]?\d+\.")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_COMMA = re.compile(r"([+-]?\d+),(\d+)")
_SPACING = re.compile(r"\\\\|\\[!,;: ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\$")
_WORD_SPACE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")


def quick_verdict(reference: str, answer: str | None, decimal_comma: bool = True) -> tuple[bool | None, str] | None:
    """(correct, reason) when it is decidable without sympy, else None. Decides only where
    math-verify says the same on well-formed LaTeX (tests/test_verify.py checks it):
    - the same text up to LaTeX spacing (`\\,` `\\!` `\\left` `\\right` `\\dfrac`, spaces): correct;
    - two exact rationals (integers, `\\frac{a}{b}`, `a/b`, `1,000`): equal or not; with a decimal:
      only "equal" is decided here (math-verify rounds floats, so "unequal" goes to it);
    - with `decimal_comma`, `2,74` and `0,111` are decimals (a comma followed by other than three
      digits, and by at least two unless the integer part is 0: `1,2` stays a list of two numbers);
    - no answer, and a reference that is a plain number (so it is readable): no_answer."""
    gold = _rational(reference, decimal_comma)
    if answer is None:
        return (False, "no_answer") if gold is not None else None
    if _canonical(answer) == _canonical(reference):
        return True, "correct"
    predicted = _rational(answer, decimal_comma)
    if gold is not None and predicted is not None:
        if gold[0] == predicted[0]:
            return True, "correct"
        if gold[1] and predicted[1]:  # both exact: unequal rationals are different numbers
            return False, "wrong"
    return None


def _rational(text: str, decimal_comma: bool = False) -> tuple[Fraction, bool] | None:
    """(value, exact) of a plain integer, fraction or decimal; None for anything else."""
    text = text.strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    elif decimal_comma:
        match = _DECIMAL_COMMA.fullmatch(text)
        if match and len(match.group(2)) != 3 and (len(match.group(2)) >= 2 or match.group(1).lstrip("+-") == "0"):
            text = f"{match.group(1)}.{match.group(2)}"
        elif match and match.group(1).lstrip("+-") == "0":
            text = f"{match.group(1)}.{match.group(2)}"  # 0,111: no thousands group starts with 0
    if _INTEGER.fullmatch(text):
        return Fraction(int(text)), True
    match = _FRACTION.fullmatch(text)
    if match:
        sign, numerator, denominator = (match.group(1), match.group(2), match.group(3)) if match.group(2) else ("", match.group(4), match.group(5))
        if int(denominator) == 0:
            return None
        value = Fraction(int(numerator), int(denominator))
        return (-value if sign == "-" else value), True
    if _DECIMAL.fullmatch(text):
        return Fraction(text), False
    return None


def _canonical(text: str) -> str:
    """The text without LaTeX spacing: `\\,` `\\!` `\\ ` `\\left` `\\right` `$` and white space
    go, `\\dfrac`/`\\tfrac` become `\\frac`; a row break `\\\\` stays, and so does the space that
    ends a command before a letter (`\\pi r` is not `\\pir`)."""
    text = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else "", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _WORD_SPACE.sub("\\1\0", text)
    return re.sub(r"\s+", "", text).replace("\0", " ")


def check(
    reference: str, answer: str | None, precision: int = 6, strict: bool = True, allow_set_relation_comp: bool = False
) -> tuple[bool | None, str]:
    """(correct, reason): reason is "correct", "wrong", "no_answer" or "bad_reference".

    A reference math-verify cannot read at all is `bad_reference` (never a wrong answer); an
    answer it cannot read is `wrong`. `precision` (decimal places floats are rounded to before
    comparing), `strict` (variables must match by name) and `allow_set_relation_comp` (a
    reference relation `1 \\le x \\le 2` may equal an interval answer) are math-verify's own
    `verify` options, passed through."""
    from math_verify import verify

    gold = list(_parse_reference(reference))
    if not gold:
        return None, "bad_reference"
    if answer is None:
        return False, "no_answer"
    predicted = _parse(answer)
    if not predicted:
        return False, "wrong"
    same = bool(verify(gold, predicted, float_rounding=precision, strict=strict,
                       allow_set_relation_comp=allow_set_relation_comp, timeout_seconds=None))
    return same, "correct" if same else "wrong"


def _parse(text: str) -> list:
    from math_verify import parse

    return parse("\\boxed{" + text + "}", parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> tuple:
    """References repeat (n samples per problem) and parsing LaTeX is the slow part (up to
    0.4 s for an interval of fractions of pi): parse each once per worker. Sympy objects are
    immutable, so sharing them between checks is safe."""
    return tuple(_parse(reference))


def warm_up() -> None:
    """Import math-verify and run one check, so a fresh worker's first real check is not slow
    (latex2sympy builds its parser on first use). Also silences math-verify's warning that its
    own timeout is off, which is on purpose here."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    check("\\frac{1}{2}", "0.5")

"""The cheap per-trace checks besides the answer: truncation, language consistency, repetition.

All are plain functions of the text, linear in its length (regexes and numpy), safe on 100k
characters.

**Language consistency** (DeepSeek-R1 filters "chain-of-thought with mixed languages"): letters
are sorted into scripts (Latin, CJK, Cyrillic, Arabic, Hebrew, Devanagari, Thai; Greek counts as
mathematics, not language). Math spans (`$...$`, `\\(...\\)`, `\\[...\\]`), LaTeX commands and
markup tags such as `<think>` are removed first. The scripts the problem uses are allowed (when
the problem has no letters, the completion's main script is). A completion fails when more than
`max_foreign_fraction` of its letters are in other scripts, or when such letters form a run
longer than `max_foreign_run` (letters counted; up to 3 spaces, digits or punctuation marks
inside a run do not break it).

**Repetition**: degenerate loops (a model stuck repeating itself until it hits max tokens). With
white space collapsed, a completion fails when some `window`-character stretch occurs more than
`max_repeats` times (overlapping windows: a loop of period p and length L repeats each of its
windows about (L - window) / p times). Defaults (200 characters, 10 times) were set on the 530
real long-CoT outputs in ../shared/data/traces: no finished one repeats any 200-character
stretch more than twice, while 21 of those cut off at max tokens repeat one 11 to 209 times. (A
first version on 20-word windows flagged finished traces that write a polynomial out many times.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SCRIPTS: dict[str, str] = {
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "cjk": "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u1100-\u11ff",
    "cyrillic": "\u0400-\u04ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
}
_LETTERS = {name: re.compile(f"[{chars}]") for name, chars in SCRIPTS.items()}
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+|<[^<>\s]{1,40}>", re.DOTALL)


def is_truncated(finish_reason: str | None) -> bool:
    """The engine stopped at max tokens: the trace never finished."""
    return finish_reason == "length"


@dataclass(frozen=True)
class LanguageResult:
    ok: bool
    allowed: tuple[str, ...]  # the scripts the problem uses
    foreign_fraction: float  # letters of the completion in other scripts / all its letters
    longest_foreign_run: int  # letters


def check_language(
    problem: str, completion: str, max_foreign_fraction: float = 0.01, max_foreign_run: int = 20
) -> LanguageResult:
    problem_counts = _script_counts(_prose(problem))
    allowed = {name for name, count in problem_counts.items() if count}
    if allowed:
        foreign_letters = re.compile("[" + "".join(SCRIPTS[name] for name in SCRIPTS if name not in allowed) + "]")
        if not foreign_letters.search(completion):  # the common case, at regex speed: nothing to count
            return LanguageResult(True, tuple(sorted(allowed)), 0.0, 0)
    prose = _prose(completion)
    counts = _script_counts(prose)
    if not allowed:  # a problem written only in symbols: the completion's main script is its language
        allowed = {max(counts, key=counts.get)} if any(counts.values()) else set(SCRIPTS)
    total = sum(counts.values())
    foreign = sum(count for name, count in counts.items() if name not in allowed)
    longest = 0
    for name in SCRIPTS:
        if name in allowed or not counts[name]:
            continue
        letters = SCRIPTS[name]
        # A run: letters of this script with at most 3 non-letters (spaces, digits, punctuation) between.
        run = re.compile(f"[{letters}](?:[^A-Za-z{letters}]{{0,3}}[{letters}])*")
        for match in run.finditer(prose):
            longest = max(longest, len(_LETTERS[name].findall(match.group(0))))
    fraction = foreign / total if total else 0.0
    ok = fraction <= max_foreign_fraction and longest <= max_foreign_run
    return LanguageResult(ok, tuple(sorted(allowed)), round(fraction, 6), longest)


@dataclass(frozen=True)
class RepetitionResult:
    ok: bool
    max_repeats: int  # occurrences of the most repeated window


_BASE = np.uint64(1_000_003)  # odd, so invertible modulo 2^64
_BASE_INVERSE = np.uint64(pow(1_000_003, -1, 1 << 64))


def check_repetition(text: str, window: int = 200, max_repeats: int = 10) -> RepetitionResult:
    """Fails when some `window`-character stretch (white space collapsed) occurs more than
    `max_repeats` times. Windows are compared by a polynomial hash modulo 2^64, all computed
    with prefix sums: O(length) numpy work, no Python loop over the text."""
    text = " ".join(text.split())
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (L,)
    length = len(codes)
    if length < window:
        return RepetitionResult(True, 1 if length else 0)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps: that is the modulus
        powers = np.full(length + 1, _BASE, dtype=np.uint64)
        powers[0] = 1
        powers = np.cumprod(powers, dtype=np.uint64)  # (L+1,) B^i
        inverse = np.full(length + 1, _BASE_INVERSE, dtype=np.uint64)
        inverse[0] = 1
        inverse = np.cumprod(inverse, dtype=np.uint64)  # (L+1,) B^-i
        prefix = np.zeros(length + 1, dtype=np.uint64)
        prefix[1:] = np.cumsum(codes * powers[:length], dtype=np.uint64)  # (L+1,) sum_{j<i} c_j B^j
        # sum_{j in [i, i+w)} c_j B^j, shifted to start at B^0 so equal windows hash equal: (L-w+1,)
        hashes = (prefix[window:] - prefix[:-window]) * inverse[: length - window + 1]
    _, counts = np.unique(hashes, return_counts=True)
    top = int(counts.max())
    return RepetitionResult(top <= max_repeats, top)


# --------------------------------------------------------------------------------------------


def _prose(text: str) -> str:
    return _MATH.sub(" ", text)


def _script_counts(text: str) -> dict[str, int]:
    return {name: len(pattern.findall(text)) for name, pattern in _LETTERS.items()}

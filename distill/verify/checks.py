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

**Repetition**: degenerate loops (a model stuck repeating itself until it hits max tokens). The
text is cut into tokens (words of at most 16 characters, and single punctuation marks, so long
runs of one character are caught too); a completion fails when any `ngram`-token window occurs
more than `max_repeats` times. Defaults (50 tokens, 10 times) were set on the 530 real long-CoT
outputs in ../shared/data/traces: every finished one repeats its most frequent 50-gram at most 6
times, while 20-token windows flagged legitimate finished traces (a polynomial written out many
times, synthetic-division tables).
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
_TOKENS = re.compile(r"\w{1,16}|[^\w\s]")


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
    prose = _prose(completion)
    counts = _script_counts(prose)
    allowed = {name for name, count in problem_counts.items() if count}
    if not allowed:  # a problem written only in symbols: the completion's main script is its language
        allowed = {max(counts, key=counts.get)} if any(counts.values()) else set(SCRIPTS)
    total = sum(counts.values())
    foreign = sum(count for name, count in counts.items() if name not in allowed)
    longest = 0
    if foreign:
        for name in SCRIPTS:
            if name in allowed or not counts[name]:
                continue
            letters = SCRIPTS[name]
            # A run: letters of this script with only non-letters (spaces, digits, punctuation) between.
            run = re.compile(f"[{letters}](?:[^A-Za-z{letters}]{{0,3}}[{letters}])*")
            for match in run.finditer(prose):
                longest = max(longest, len(_LETTERS[name].findall(match.group(0))))
    fraction = foreign / total if total else 0.0
    ok = fraction <= max_foreign_fraction and longest <= max_foreign_run
    return LanguageResult(ok, tuple(sorted(allowed)), round(fraction, 6), longest)


@dataclass(frozen=True)
class RepetitionResult:
    ok: bool
    max_repeats: int  # occurrences of the most repeated n-gram


def check_repetition(text: str, ngram: int = 50, max_repeats: int = 10) -> RepetitionResult:
    tokens = _TOKENS.findall(text)
    if len(tokens) < ngram:
        return RepetitionResult(True, 1 if tokens else 0)
    vocabulary: dict[str, int] = {}
    ids = np.fromiter((vocabulary.setdefault(t, len(vocabulary)) for t in tokens), dtype=np.uint64, count=len(tokens))
    # Rolling polynomial hash of every window, (W, ngram) @ (ngram,) with uint64 wrap-around.
    windows = np.lib.stride_tricks.sliding_window_view(ids, ngram)  # (W, ngram)
    powers = np.full(ngram, 1_000_003, dtype=np.uint64) ** np.arange(ngram, dtype=np.uint64)
    with np.errstate(over="ignore"):
        hashes = (windows * powers).sum(axis=1, dtype=np.uint64)  # (W,)
    _, counts = np.unique(hashes, return_counts=True)
    top = int(counts.max())
    return RepetitionResult(top <= max_repeats, top)


# --------------------------------------------------------------------------------------------


def _prose(text: str) -> str:
    return _MATH.sub(" ", text)


def _script_counts(text: str) -> dict[str, int]:
    return {name: len(pattern.findall(text)) for name, pattern in _LETTERS.items()}

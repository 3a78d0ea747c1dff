"""Rewards of `distill grpo`: the shared verifier's verdict, plus optional shaping terms.

    reward = accuracy_weight * [verifier says correct]
           + format_weight   * [<think> block, then a boxed answer]     (distill.verify.check_format)
           + overlong_weight * soft_overlong_penalty(length)            (DAPO; only when the
                                                                         algorithm's overlong = "penalty")
           - repetition_weight * [the completion loops]                  (distill.verify.check_repetition,
                                                                         the filter's own loop test)

Accuracy comes from `distill.verify.Verifier`, the same extraction and equivalence check that
filters teacher traces and scores the benchmarks, so the RL reward cannot drift from the eval.
The one deliberate difference is the run's `no_answer_fallback` (grpo: "none", an answer with
no box and no "answer is" earns no accuracy reward; eval: "last"), set where the Verifier is made.
A completion is graded on its full text (the template's `<think>` prefill included, see
`distill.teacher.prompts.full_completion`), so the format check sees what the model was shown.

A reward is unknown, not 0, when the reference cannot be checked (the problem has no answer, or
the verifier cannot parse it: reason "no_reference" / "bad_reference") or the verifier timed out
("timeout"). Rewarding those 0 would teach the model that a right answer to an unparseable
reference is wrong; instead the completion takes no part in its group's statistics nor in the
loss, and the run counts them (metrics `unverifiable`, `timeouts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RewardConfig:
    accuracy: float = 1.0  # the verifier's verdict; the signal the paper trains on
    # The R1 paper uses a format reward but gives no weight; 0.1 keeps it a shaping term:
    # a well-formed wrong answer always scores below a correct one.
    format: float = 0.1
    overlong: float = 1.0  # weight of DAPO's soft overlong punishment (used when overlong = "penalty")
    overlong_buffer: int | None = None  # DAPO's L_cache in tokens; None: max_tokens // 5 (DAPO: 4096 of 20480)
    repetition: float = 0.0  # weight of the repetition penalty (0: off)
    repetition_window: int = 200  # a loop is a stretch of this many characters ...
    repetition_max_repeats: int = 10  # ... occurring more often than this (the filter's defaults)

    def __post_init__(self) -> None:
        if self.overlong_buffer is not None and self.overlong_buffer <= 0:
            raise ValueError("rewards.overlong_buffer must be a positive number of tokens (or null for max_tokens // 5)")
        if self.repetition_window < 1 or self.repetition_max_repeats < 1:
            raise ValueError("rewards.repetition_window and rewards.repetition_max_repeats must be at least 1")


@dataclass(frozen=True)
class Reward:
    total: float | None  # None: unknown (see `reason`); the completion is left out of training
    correct: bool | None
    formatted: bool
    overlong: float  # the (weighted) length penalty, <= 0
    repetition: float  # the (weighted) repetition penalty, <= 0
    reason: str  # the verifier's reason ("correct", "wrong", "no_answer", "bad_reference", "timeout") or "no_reference"


UNKNOWN_REASONS = ("no_reference", "bad_reference", "timeout")


def soft_overlong_penalty(length: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_tokens - buffer tokens, then falling
    linearly to -1 at max_tokens, and -1 beyond it."""
    expected = max_tokens - buffer
    if length <= expected:
        return 0.0
    if length <= max_tokens:
        return (expected - length) / buffer
    return -1.0


def score(
    verifier,
    references: Sequence[str | None],
    completions: Sequence[str],
    lengths: Sequence[int],
    cfg: RewardConfig,
    *,
    max_tokens: int,
    overlong_penalty: bool,
    think: tuple[str, str] = ("<think>", "</think>"),
) -> list[Reward]:
    """One Reward per completion. references[i] is the reference answer of completion i's problem
    (None: the problem has none); completions are full texts (prefill included); lengths are the
    generated token counts."""
    from distill.verify import check_format, check_repetition

    assert len(references) == len(completions) == len(lengths), "one reference and one length per completion"
    graded = [i for i, reference in enumerate(references) if reference is not None]
    verdicts = dict(zip(graded, verifier.grade([(references[i], completions[i]) for i in graded]) if graded else []))
    buffer = cfg.overlong_buffer or max(1, max_tokens // 5)
    rewards = []
    for i, (completion, length) in enumerate(zip(completions, lengths)):
        verdict = verdicts.get(i)
        formatted = bool(check_format(completion, think=think))
        overlong = cfg.overlong * soft_overlong_penalty(length, max_tokens, buffer) if overlong_penalty else 0.0
        loops = cfg.repetition and not check_repetition(completion, window=cfg.repetition_window, max_repeats=cfg.repetition_max_repeats).ok
        repetition = -cfg.repetition if loops else 0.0
        if verdict is None or verdict.correct is None:
            reason = "no_reference" if verdict is None else verdict.reason
            rewards.append(Reward(None, None, formatted, overlong, repetition, reason))
            continue
        total = cfg.accuracy * float(verdict.correct) + cfg.format * float(formatted) + overlong + repetition
        rewards.append(Reward(total, bool(verdict.correct), formatted, overlong, repetition, verdict.reason))
    return rewards

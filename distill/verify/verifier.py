"""The verifier: is a completion's final answer equal to the reference? One implementation for
`distill filter` (rejection sampling), `distill eval` (scoring) and `distill grpo` (reward).

    with Verifier(workers=2, timeout_s=5.0) as verifier:
        verdicts = verifier.grade([(reference, completion), ...])

Per pair: the reference's final answer (`reference_answer`: GSM8K `#### 72`, a boxed worked
solution, or the answer itself) and the completion's (`extract_answer`: after the reasoning
only) are taken in this process; settled here when sympy is not needed (`quick_verdict`: the same
text up to LaTeX spacing, plain numbers); else looked up in the cache keyed by (reference
answer, extracted answer); else checked by
math-verify in a worker process under a hard wall-clock limit (`distill.verify.pool`). Pairs
repeated within one call are checked once; a check that overran (or whose worker died) is run
once more after the rest of its batch before "timeout" becomes its (cached) verdict.

Options: `no_answer_fallback` ("none": a completion with no box, no "answer is" and no `####` has
no answer; "last": its last math span or number; each stage picks its default, see
docs/filter.md), math-verify's own `precision`, `strict` and `allow_set_relation_comp`, and
`decimal_comma` (`2,74` is 2.74 beside a number).

Verdict reasons: "correct" | "wrong" | "no_answer" (nothing extractable) | "bad_reference"
(the reference is missing or math-verify cannot read it: `correct` is None, never counted as
wrong) | "timeout" (the check did not finish within the limit: hung, crashed or raised;
`correct` is None). Reference problems win over a missing answer: with a bad reference nothing
can be judged.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from distill.verify.equivalence import quick_verdict
from distill.verify.extract import FALLBACKS, extract_answer, reference_answer
from distill.verify.pool import HardLimitPool, default_workers

_CACHE_LIMIT = 1_000_000  # entries; a GRPO run grades millions of pairs, memory must stay bounded


@dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None when not decided (bad_reference, timeout)
    extracted: str | None  # the final answer taken from the completion
    reason: str  # "correct" | "wrong" | "no_answer" | "bad_reference" | "timeout"


class Verifier:
    """Context manager; a process pool with a hard wall-clock limit per check (started on the
    first check that needs it). Thread-safe: concurrent `grade` calls run one after another."""

    def __init__(
        self,
        workers: int | None = None,
        timeout_s: float = 5.0,
        think_tags: tuple[str, str] = ("<think>", "</think>"),
        memory_limit_mb: int | None = 4096,
        no_answer_fallback: str = "none",
        precision: int = 6,
        strict: bool = True,
        allow_set_relation_comp: bool = False,
        decimal_comma: bool = True,
    ):
        assert timeout_s > 0, f"timeout_s must be positive, got {timeout_s}"
        if no_answer_fallback not in FALLBACKS:
            raise ValueError(f"no_answer_fallback must be one of {', '.join(FALLBACKS)}, got {no_answer_fallback!r}")
        if precision < 0:
            raise ValueError(f"precision (decimal places floats are compared to) must be >= 0, got {precision}")
        assert len(think_tags) == 2 and think_tags[1], f"think_tags is (start, end) with a non-empty end, got {think_tags!r}"
        self.workers = workers or default_workers()
        self.timeout_s = float(timeout_s)
        self.think_tags = (think_tags[0], think_tags[1])
        self.memory_limit_mb = memory_limit_mb
        self.no_answer_fallback = no_answer_fallback
        # math-verify's comparison options, sent with every check (the cache is per Verifier)
        self.options = (int(precision), bool(strict), bool(allow_set_relation_comp))
        self.decimal_comma = bool(decimal_comma)
        self.stats: Counter[str] = Counter()  # pairs, quick, cached, checked, timeout, crashed, error
        self.latencies: list[float] = []  # seconds of each check a worker ran (for benchmarks)
        self._cache: dict[tuple[str, str | None], tuple[bool | None, str]] = {}
        self._pool: HardLimitPool | None = None
        self._lock = threading.Lock()

    def grade(self, items: Sequence[tuple[str | None, str]]) -> list[Verdict]:
        """One Verdict per (reference, completion) pair, in order."""
        with self._lock:
            return self._grade(items)

    def grade_one(self, reference: str | None, completion: str) -> Verdict:
        return self.grade([(reference, completion)])[0]

    def equal(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
        """Are two final answers the same (no extraction: e.g. to group sampled answers for a
        majority vote)? None when undecided (the first cannot be read, or the check timed out)."""
        with self._lock:
            results: list[bool | None] = [None] * len(pairs)
            pending: dict[tuple[str, str | None], list[int]] = {}
            for index, (first, second) in enumerate(pairs):
                key = (first.strip(), second.strip())
                known = self._cache.get(key) or quick_verdict(*key, decimal_comma=self.decimal_comma)
                if known is not None:
                    results[index] = known[0]
                else:
                    pending.setdefault(key, []).append(index)
            if pending:
                keys = list(pending)
                for key, outcome in zip(keys, self._check(keys)):
                    self._remember(key, outcome)
                    for index in pending[key]:
                        results[index] = outcome[0]
            return results

    def group(self, answers: Sequence[str | None]) -> list[int | None]:
        """Equivalence classes of final answers (no extraction), for a majority vote: answer i
        gets the index of the first answer it equals (`1/2`, `0.5` and `\\frac{1}{2}` all get the
        index of the first of them); None stays None. Each distinct text is compared with the
        first member of every class found so far (quick verdicts first, then math-verify), so an
        undecided comparison (timeout) keeps two answers apart."""
        first_of: dict[str, int] = {}  # distinct text -> index of its first occurrence
        leaders: list[int] = []  # index of the first member of each class
        classes: dict[str, int] = {}
        for index, answer in enumerate(answers):
            if answer is None or not answer.strip():
                continue
            text = answer.strip()
            if text in first_of:
                continue
            first_of[text] = index
            same = self.equal([(answers[leader].strip(), text) for leader in leaders]) if leaders else []
            match = next((leader for leader, equal in zip(leaders, same) if equal), None)
            if match is None:
                leaders.append(index)
                match = index
            classes[text] = match
        return [None if a is None or not a.strip() else classes[a.strip()] for a in answers]

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self.stats["restarts"] += self._pool.restarts
                self._pool.close()
                self._pool = None

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave processes behind
        pool = getattr(self, "_pool", None)
        if pool is not None:
            try:
                pool.close()
            except Exception:  # at interpreter exit modules may be half torn down; workers are daemons anyway
                pass

    # ----------------------------------------------------------------------------------------

    def _grade(self, items: Sequence[tuple[str | None, str]]) -> list[Verdict]:
        start, end = self.think_tags
        verdicts: list[Verdict | None] = [None] * len(items)
        extracted: list[str | None] = [None] * len(items)
        pending: dict[tuple[str, str | None], list[int]] = {}
        for index, (reference, completion) in enumerate(items):
            self.stats["pairs"] += 1
            answer = extract_answer(completion, think_end=end, think_start=start, fallback=self.no_answer_fallback)
            extracted[index] = answer
            gold = reference_answer(reference)
            if gold is None:
                verdicts[index] = Verdict(None, answer, "bad_reference")
                self.stats["quick"] += 1
                continue
            key = (gold, answer)
            known = self._cache.get(key)
            if known is not None:
                self.stats["cached"] += 1
            else:
                known = quick_verdict(gold, answer, decimal_comma=self.decimal_comma)
                if known is not None:
                    self.stats["quick"] += 1
            if known is not None:
                verdicts[index] = Verdict(known[0], answer, known[1])
            else:
                pending.setdefault(key, []).append(index)
        if pending:
            keys = list(pending)
            for key, outcome in zip(keys, self._check(keys)):
                self._remember(key, outcome)
                for index in pending[key]:
                    verdicts[index] = Verdict(outcome[0], extracted[index], outcome[1])
        return verdicts  # type: ignore[return-value]

    _task = "distill.verify.equivalence:check"  # module:function the workers run (tests swap in stand-ins)

    def _check(self, keys: list[tuple[str, str | None]]) -> list[tuple[bool | None, str]]:
        if self._pool is None:
            self._pool = HardLimitPool(
                self._task,
                workers=self.workers,
                timeout_s=self.timeout_s,
                warm_up="distill.verify.equivalence:warm_up",
                preload=["distill.verify.equivalence", "math_verify"],
                memory_limit_mb=self.memory_limit_mb,
            )
        outcomes = self._run(keys)
        # A check that overran (or whose worker died) may have met a busy machine rather than a
        # hard input: run those once more, after the rest of the batch, before "timeout" sticks.
        again = [i for i, outcome in enumerate(outcomes) if outcome.status in ("timeout", "crashed")]
        if again:
            self.stats["retried"] += len(again)
            for index, outcome in zip(again, self._run([keys[i] for i in again])):
                outcomes[index] = outcome
        results = []
        for outcome in outcomes:
            if outcome.status == "ok":
                results.append(tuple(outcome.value))
            else:
                self.stats[outcome.status] += 1  # timeout | crashed | error: undecided
                results.append((None, "timeout"))
        return results

    def _run(self, keys: list[tuple[str, str | None]]) -> list:
        outcomes = self._pool.run([(*key, *self.options) for key in keys])
        self.stats["checked"] += len(outcomes)
        self.latencies.extend(outcome.seconds for outcome in outcomes)
        return outcomes

    def _remember(self, key: tuple[str, str | None], outcome: tuple[bool | None, str]) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            for old in list(self._cache)[: _CACHE_LIMIT // 2]:  # dicts keep insertion order: oldest first
                del self._cache[old]
        self._cache[key] = outcome

    def summary(self) -> dict[str, float]:
        """Counts for a run's stats: pairs graded, settled without a worker, cache hits, checks
        run in workers, undecided ones, workers replaced."""
        restarts = self.stats["restarts"] + (self._pool.restarts if self._pool is not None else 0)
        return {**{k: v for k, v in self.stats.items() if k != "restarts"}, "worker_restarts": restarts}

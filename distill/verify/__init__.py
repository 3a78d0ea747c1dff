"""The one verifier, shared by `distill filter`, `distill eval` and `distill grpo`.

    from distill.verify import Verifier, Verdict, extract_answer, check_format

    with Verifier(workers=4, timeout_s=5.0, think_tags=("<think>", "</think>"), no_answer_fallback="none") as verifier:
        verdicts = verifier.grade([(reference, completion), ...])   # order kept
    verdicts[0].correct, verdicts[0].extracted, verdicts[0].reason

Modules: `extract` (final answer after the reasoning, references, format), `equivalence`
(math-verify, run in workers), `pool` (processes with a hard wall-clock limit per check),
`verifier` (Verifier: extraction + cache + pool), `checks` (truncation, language, repetition),
`length` (conversation length in the student's tokenizer).
"""

from distill.verify.checks import LanguageResult, RepetitionResult, check_language, check_repetition, is_truncated
from distill.verify.extract import check_format, extract_answer, find_answer, last_boxed, reference_answer, split_completion
from distill.verify.verifier import Verdict, Verifier

__all__ = [
    "Verifier",
    "Verdict",
    "extract_answer",
    "check_format",
    "find_answer",
    "last_boxed",
    "reference_answer",
    "split_completion",
    "check_language",
    "check_repetition",
    "is_truncated",
    "LanguageResult",
    "RepetitionResult",
]

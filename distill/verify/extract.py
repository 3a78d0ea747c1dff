"""Answer extraction and the format check: plain string work, no sympy, linear in the text.

The final answer is taken from the text after the reasoning only: a `\\boxed{}` written while
thinking is a draft, not an answer. Order of preference in that final text:

1. the last balanced `\\boxed{...}` / `\\fbox{...}` (nested braces, escaped `\\{ \\}` skipped;
   an empty or unbalanced box is passed over for the one before it), or `\\boxed 5`;
2. the last "answer is X" / "answer: X" whose X (on the same line) is a math span (`$...$`,
   `\\(...\\)`), else a leading number, else a choice letter `(C)`; prose is not an answer;
3. the last GSM8K-style `#### X`.

There is deliberately no "last number in the text" fallback: a trace whose answer cannot be
found is rejected as `no_answer` rather than credited with a number picked from its working.
"""

from __future__ import annotations

import re

from distill.problems import gsm8k_reference

THINK = ("<think>", "</think>")

_BOX_COMMANDS = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is\b|:)\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_LEADING_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_CHOICE = re.compile(r"\(?([A-E])\)?(?=[\s.,;:]|$)")


def split_completion(completion: str, think: tuple[str, str] = THINK) -> tuple[str | None, str | None]:
    """(reasoning, final text). The final text is what follows the last end-of-thinking tag; with
    no end tag it is the whole completion when there is no start tag either (a model that does
    not think), and None when thinking started but never ended (cut off mid-thought)."""
    start, end = think
    cut = completion.rfind(end)
    if cut >= 0:
        reasoning = completion[:cut]
        opened = reasoning.find(start)
        if opened >= 0:
            reasoning = reasoning[opened + len(start):]
        return reasoning, completion[cut + len(end):]
    if start and start in completion:
        return completion[completion.find(start) + len(start):], None
    return None, completion


def extract_answer(completion: str, think_end: str = "</think>", think_start: str | None = "<think>") -> str | None:
    """The final answer of a completion, or None when it gives none (see the module docstring)."""
    _, final = split_completion(completion, (think_start or "", think_end))
    if final is None:
        return None
    return find_answer(final)


def find_answer(text: str) -> str | None:
    """The answer written in `text` (already the final part of a completion)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_ANSWER_PHRASE.finditer(text))
    for match in reversed(phrases):
        answer = _answer_after_phrase(match.group(1))
        if answer:
            return answer
    hashes = list(_HASHES.finditer(text))
    for match in reversed(hashes):
        answer = _clean(match.group(1))
        if answer:
            return answer
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last balanced, non-empty `\\boxed{...}` or `\\fbox{...}` in `text`."""
    starts = [m.end() for m in _BOX_COMMANDS.finditer(text)]
    if not starts:
        return None
    closing = _matching_braces(text)  # one linear pass: position of '{' -> position of its '}'
    for position in reversed(starts):
        index = position
        while index < len(text) and text[index] in " \t":
            index += 1
        if index < len(text) and text[index] == "{":
            close = closing.get(index)
            if close is None:
                continue  # unbalanced (cut off): an earlier box may still be whole
            content = _clean(text[index + 1 : close])
        elif index > position:  # "\boxed 5": one token, TeX's own brace-less argument
            content = _clean(re.match(r"[^\s$]*", text[index:]).group(0))
        else:
            continue  # "\boxedfoo" or a box at the very end
        if content:
            return content
    return None


def reference_answer(reference: str | None) -> str | None:
    """The final answer of a reference: GSM8K's `... #### 72` -> `72`; a worked solution with a
    `\\boxed{}` -> its last box; surrounding `$` removed. None when nothing is left."""
    if reference is None:
        return None
    text = str(reference).strip()
    if "####" in text:
        text = gsm8k_reference(text)
    elif "\\boxed" in text or "\\fbox" in text:
        text = last_boxed(text) or ""
    text = _clean(text)
    return text or None


def check_format(completion: str, think: tuple[str, str] = THINK) -> bool:
    """Exactly one non-empty `<think> ... </think>` block at the start, followed by a non-empty
    final part. (Whether that final part holds an answer is the verifier's call: `no_answer`.)"""
    start, end = think
    if completion.count(start) != 1 or completion.count(end) != 1:
        return False
    opened, closed = completion.find(start), completion.find(end)
    if completion[:opened].strip() or closed < opened:
        return False
    reasoning = completion[opened + len(start) : closed]
    final = completion[closed + len(end) :]
    return bool(reasoning.strip()) and bool(final.strip())


# --------------------------------------------------------------------------------------------
# internals


def _matching_braces(text: str) -> dict[int, int]:
    """Map each '{' that is closed to its '}' (a backslash escapes the next character)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    index, length = 0, len(text)
    find = re.compile(r"[\\{}]").search
    while True:
        match = find(text, index)
        if match is None:
            return pairs
        index = match.start()
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            stack.append(index)
        elif stack:
            pairs[stack.pop()] = index
        index += 1
        if index >= length:
            return pairs


def _answer_after_phrase(rest: str) -> str | None:
    """What follows "answer is": a math span, else a leading number, else a choice letter;
    prose ("the answer is correct") is not an answer."""
    math = _MATH_SPAN.search(rest)
    if math:
        return _clean(next(group for group in math.groups() if group is not None))
    rest = rest.replace("**", "").strip()
    number = _LEADING_NUMBER.match(rest)
    if number:
        return _clean(number.group(0))
    choice = _CHOICE.match(rest)
    if choice:
        return choice.group(1)
    return None


def _clean(answer: str) -> str:
    """Trim whitespace, surrounding `$` / `\\(` `\\)`, and a sentence's full stop."""
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    if answer.endswith("."):  # a sentence's full stop; no answer ends with a bare "."
        answer = answer[:-1].rstrip()
    return answer

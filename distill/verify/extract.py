"""Answer extraction and the format check: plain string work, no sympy, linear in the text.

The final answer is taken from the text after the reasoning only: a `\\boxed{}` written while
thinking is a draft, not an answer. In that final text the answer is the last of these, by
position (a later statement corrects an earlier one):

1. a run of boxes: the last balanced, non-empty `\\boxed{...}` / `\\fbox{...}` (nested braces,
   escaped `\\{ \\}` skipped; an empty or unbalanced box is passed over), or `\\boxed 5`, together
   with the boxes just before it that only commas, "and", "or", `\\quad` or math delimiters
   (or one word before an "and") separate from it: `\\boxed{-2} and \\boxed{1}` is the
   answer `-2, 1`, and a box repeated word for word counts once. Boxes with other words
   between them are drafts: only the last run counts;
2. an "answer is X" / "answer: X" / "Answer $X$" whose X (on the same line) is a math span
   (`$...$`, `\\(...\\)`), a leading number or a choice letter `(C)`; when X is a sentence
   ("The largest $n$ is 34."), what follows its last "is" / "=" ("34"). Prose is not an answer.
   Nested phrases ("Final Answer: The final answer is 7.78.") are each tried, the innermost
   first;
3. a GSM8K-style `#### X`.

When none is found, the `no_answer_fallback` decides (chosen per stage, see docs/filter.md):
- "none": no answer (`no_answer`): a trace without a clear final answer is not credited with a
  number picked from its working;
- "last": the last math span (`$...$`, `\\(...\\)`, `\\[...\\]`) or free-standing number of the
  final text, whichever ends later (what math-verify falls back to), so unboxed answers of base
  models and students are graded.
"""

from __future__ import annotations

import re

from distill.problems import gsm8k_reference

FALLBACKS = ("none", "last")

THINK = ("<think>", "</think>")

_BOX_COMMANDS = re.compile(r"\\(?:boxed|fbox)")
# "answer is" / "answer:" / "answer" right before a math span; only the phrase is matched, so a
# phrase nested in the line of another ("Final Answer: The final answer is 7.78.") is found too.
_ANSWER_PHRASE = re.compile(r"(?:answer|réponse|答案)\s*(?:is\b|[:：]|(?=\s*(?:\$|\\\(|\\\[)))[ \t]*[:：]?[ \t]*", re.IGNORECASE)
_PHRASE_HINT = re.compile(r"nswer|NSWER|éponse|ÉPONSE|答案")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# $$...$$ and \[...\] may span lines; $...$ and \(...\) may not (an escaped \$ is a dollar sign)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$((?:[^$\\\n]|\\[^\n])+?)\$|\\\(([^\n]+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_LEADING_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
# A free-standing number (not part of a word, a subscript or a LaTeX argument): 1,000.5, 1 000,
# 2,74 (a decimal comma), 3/4, .5, \frac{1}{2}.
_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.,{\\])[-+]?(?:\d{1,3}(?:[, ]\d{3})+(?![\d,])|\d+(?:,\d+)?)(?:\.\d+)?(?:\s*/\s*\d+)?"
    r"|(?<![A-Za-z0-9_.,{\\])[-+]?\.\d+|[-+]?\\[dtc]?frac\{\d+\}\{\d+\}"
)
_SEPARATOR_WORDS = re.compile(r"\b(?!(?:and|or)\b)[A-Za-z]+\b")
_DELIMITER = re.compile(r"\$\$|(?<!\\)\$|\\[()\[\]]")
_CLOSER = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_REST_LIMIT = 500  # characters read after an "answer is": an answer is never longer
_PHRASES_TRIED = 100  # the last this many "answer is" of a text (bounds the work on degenerate text)
_TOKEN = re.compile(r"[^\s$]*")  # the argument of a brace-less `\boxed 5`
_WORD = re.compile(r"[^\W\d_]{3,}")  # a word of prose (any script), for telling prose from bare math
_CHOICE = re.compile(r"\(?([A-E])\)?(?=[\s.,;:]|$)")
_COPULA = re.compile(r"\s(?:is|are|equals|=)\s", re.IGNORECASE)
# What may stand between two boxes of one answer: `\boxed{-2} and \boxed{1}`, `$\boxed{1}$, $\boxed{2}$`.
_BOX_SEPARATOR = re.compile(
    r"(?:\s|[,;&$]|\\[()\[\]]|\\\\|\\[,;:! ]|\\q?quad\b|\\(?:text|mbox)\{[^{}$]{0,40}\}|\band\b|\bor\b)*"
)


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


def extract_answer(
    completion: str, think_end: str = "</think>", think_start: str | None = "<think>", fallback: str = "none"
) -> str | None:
    """The final answer of a completion, or None when it gives none (see the module docstring)."""
    _, final = split_completion(completion, (think_start or "", think_end))
    if final is None:
        return None
    return find_answer(final, fallback=fallback)


def find_answer(text: str, fallback: str = "none") -> str | None:
    """The answer written in `text` (already the final part of a completion)."""
    assert fallback in FALLBACKS, f"fallback must be one of {FALLBACKS}, got {fallback!r}"
    run = _last_box_run(text)
    # the later statement wins: only a phrase after the last box run's start can beat it
    phrase = _last_phrase(text, start=run[2] if run is not None else 0)
    found = [answer for answer in (run, phrase) if answer is not None]
    if found:
        return max(found, key=lambda item: item[0])[1]
    for match in reversed(list(_HASHES.finditer(text))):
        answer = _clean(match.group(1))
        if answer:
            return answer
    if fallback == "last":
        if _is_bare_math(text):
            return _clean(text) or None  # the whole text is the answer ("\\frac{10}{9}", "x^2 + 2*x + 1")
        return _last_math_or_number(text)
    return None


def last_boxed(text: str) -> str | None:
    """The answer the last run of boxes in `text` gives (see the module docstring), or None."""
    run = _last_box_run(text)
    return run[1] if run is not None else None


def reference_answer(reference: str | None) -> str | None:
    """The final answer of a reference: GSM8K's `... #### 72` -> `72`; a worked solution with a
    `\\boxed{}` -> its last run of boxes (`\\boxed{1}` and `\\boxed{-2}` -> `1, -2`); a worked
    solution without one that states "the answer is X" -> X; surrounding `$` removed. None when
    nothing is left."""
    if reference is None:
        return None
    text = str(reference).strip()
    if "####" in text:
        text = gsm8k_reference(text)
    elif "\\boxed" in text or "\\fbox" in text:
        text = last_boxed(text) or ""
    elif _is_prose(text):
        text = find_answer(text) or text
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


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each balanced, non-empty box, in order."""
    starts = [(m.start(), m.end()) for m in _BOX_COMMANDS.finditer(text)]
    if not starts:
        return []
    closing = _matching_braces(text)  # one linear pass: position of '{' -> position of its '}'
    boxes = []
    for begin, position in starts:
        index = position
        while index < len(text) and text[index] in " \t":
            index += 1
        if index < len(text) and text[index] == "{":
            close = closing.get(index)
            if close is None:
                continue  # unbalanced (cut off): an earlier box may still be whole
            content, end = _clean(text[index + 1 : close]), close + 1
        elif index > position:  # "\boxed 5": one token, TeX's own brace-less argument
            token = _TOKEN.match(text, index).group(0)
            content, end = _clean(token), index + len(token)
        else:
            continue  # "\boxedfoo" or a box at the very end
        if content:
            boxes.append((begin, end, content))
    return boxes


def _last_box_run(text: str) -> tuple[int, str, int] | None:
    """(end position, answer, start position) of the last run of boxes: the last box and those
    before it that only separators part from it; contents repeated word for word count once."""
    boxes = _boxes(text)
    if not boxes:
        return None
    run = [boxes[-1]]  # last box first
    for box in reversed(boxes[:-1]):
        if box[1] > run[-1][0] or not _joins(text[box[1] : run[-1][0]]):
            break  # a box nested in the next, or words between: an earlier draft
        run.append(box)
    contents = list(dict.fromkeys(content for _, _, content in reversed(run)))
    return boxes[-1][1], ", ".join(contents), run[-1][0]


def _joins(between: str) -> bool:
    """Do two boxes with `between` between them give one answer? Only separators (`,` "and"
    `\\quad` `$` ...), or one word before an "and" / "or" ("\\boxed{1} papers and
    \\boxed{2}"). Any other words make the earlier box a draft ("\\boxed{1}, finally \\boxed{2}")."""
    if _BOX_SEPARATOR.fullmatch(between):
        return True
    words = _SEPARATOR_WORDS.findall(between)
    return len(words) <= 1 and bool(re.search(r"\b(?:and|or)\b", between)) and bool(
        _BOX_SEPARATOR.fullmatch(_SEPARATOR_WORDS.sub(" ", between))
    )


def _last_phrase(text: str, start: int = 0) -> tuple[int, str] | None:
    """(position, answer) of the last "answer is X" after `start` whose X is an answer."""
    for match in reversed(list(_phrases(text, start))[-_PHRASES_TRIED:]):
        line_end = text.find("\n", match.end(), match.end() + _REST_LIMIT)
        rest = text[match.end() : line_end if line_end >= 0 else match.end() + _REST_LIMIT]
        if not rest.replace("**", "").strip() and match.group(0).rstrip().endswith((":", "：")):
            rest = _next_line(text, line_end)  # "**Final Answer:**\n$5$"
        answer = _answer_after_phrase(rest)
        if answer:
            return match.end(), answer
    return None


def _phrases(text: str, start: int):
    """`_ANSWER_PHRASE` matches after `start`, found through a case-sensitive hint first (a
    case-insensitive regex scan is 5x slower on 100k-character traces)."""
    for hint in _PHRASE_HINT.finditer(text, start):
        begin = hint.start() - (0 if hint.group(0) == "答案" else 1)
        if begin >= start:
            match = _ANSWER_PHRASE.match(text, begin)
            if match:
                yield match


def _next_line(text: str, line_end: int) -> str:
    if line_end < 0:
        return ""
    following = text[line_end + 1 : line_end + 1 + _REST_LIMIT].lstrip("\n")
    cut = following.find("\n")
    return following if cut < 0 else following[:cut]


def _answer_after_phrase(rest: str) -> str | None:
    """What follows "answer is": a math span, a leading number or a choice letter; in a
    sentence ("The largest $n$ is 34."), what follows its last "is" / "="; prose ("the answer is
    correct") is not an answer."""
    rest = rest.replace("**", "").strip()
    answer = _leading_answer(rest)
    if answer:
        return answer
    copulas = list(_COPULA.finditer(" " + rest))
    for copula in reversed(copulas):
        answer = _leading_answer(rest[copula.end() - 1 :].strip())
        if answer:
            return answer
    if _BOX_COMMANDS.search(rest):
        return None  # "the answer is \boxed{...}": the box run answers
    spans = [content for _, _, content, broken in _math_spans(rest) if not broken and _clean(content)]
    return _clean(spans[0]) if spans else None


def _leading_answer(rest: str) -> str | None:
    math = _MATH_SPAN.match(rest)
    if math:
        return _clean(next(group for group in math.groups() if group is not None)) or None
    number = _LEADING_NUMBER.match(rest)
    if number:
        return _clean(number.group(0))
    choice = _CHOICE.match(rest)
    if choice:
        return choice.group(1)
    return None


def _last_math_or_number(text: str) -> str | None:
    """The fallback: the last math span or free-standing number, whichever ends later."""
    candidates = []
    spans = _math_spans(text)
    whole = [(end, content) for start, end, content, broken in spans if not broken and _clean(content)]
    if whole:
        candidates.append((whole[-1][0], _clean(whole[-1][1])))
    # numbers inside an inline `$...$` / `\\(...\\)` broken over lines (malformed, not math) do not count
    pieces, cut = [], 0
    for start, end, _, broken in spans:
        if broken:
            pieces += [text[cut:start], " " * (end - start)]
            cut = end
    number = _last_number("".join(pieces) + text[cut:])
    if number is not None:
        candidates.append((number.end(), number.group(0).strip()))
    if not candidates:
        return None
    return max(candidates, key=lambda item: item[0])[1]


def _math_spans(text: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, content, broken) of each math span, in one linear pass over the delimiters:
    `$$...$$`, `$...$`, `\\(...\\)`, `\\[...\\]` (an escaped `\\$` is a dollar sign). An inline span
    (`$`, `\\(`) whose content has a line break is malformed: `broken`. An opener never closed is
    not a span. (A regex per span would rescan the text from every unclosed opener: quadratic.)"""
    spans, opened = [], None
    for token in _DELIMITER.finditer(text):
        delimiter = token.group(0)
        if opened is None:
            if delimiter in _CLOSER:
                opened = token
        elif delimiter == _CLOSER[opened.group(0)]:
            content = text[opened.end() : token.start()]
            broken = opened.group(0) in ("$", "\\(") and "\n" in content
            spans.append((opened.start(), token.end(), content, broken))
            opened = None
    return spans


def _last_number(text: str):
    """The last `_NUMBER` match, searched in growing tails of the text (the scan is slow and the
    answer is near the end); a match at a tail's first character may be cut, so it widens."""
    window = 2048
    while True:
        begin = max(0, len(text) - window)
        numbers = list(_NUMBER.finditer(text, begin))
        if numbers and (numbers[-1].start() > begin or begin == 0):
            return numbers[-1]
        if begin == 0:
            return None
        window *= 4


def _is_bare_math(text: str) -> bool:
    """Only mathematics: no word of prose outside LaTeX commands and `\\text{}`, one line."""
    text = text.strip()
    if not text or len(text) > 300 or "\n" in text:
        return False
    outside = re.sub(r"\\(?:text|mathrm|textbf|mbox|operatorname)\{[^{}]*\}|\\[A-Za-z]+", " ", text)
    return not _WORD.search(outside)


def _is_prose(text: str) -> bool:
    """A worked solution rather than an answer: several words outside math."""
    outside, cut = [], 0
    for start, end, _, _ in _math_spans(text):
        outside.append(text[cut:start])
        cut = end
    outside = " ".join(outside) + " " + text[cut:]
    outside = re.sub(r"\\[A-Za-z]+\{[^{}]*\}|\\[A-Za-z]+", " ", outside)
    return len(re.findall(r"[A-Za-z]{2,}", outside)) >= 4


def _clean(answer: str) -> str:
    """Trim whitespace, surrounding `$` / `\\(` `\\)`, and a sentence's full stop."""
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    if answer.endswith("."):  # a sentence's full stop; no answer ends with a bare "."
        answer = answer[:-1].rstrip()
    if answer.endswith("\\") and not answer.endswith("\\\\"):  # a stray backslash ("185\\")
        answer = answer[:-1].rstrip()
    return answer

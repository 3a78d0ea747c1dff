"""The embedded toy world: a synthetic, verifiable reasoning task small enough for a laptop CPU.

    python -m distill.toy build            # data + both toy models, trained with `distill train`
    distill demo [--quick]                 # the whole pipeline on this world (distill/toy/demo.py)

**The task.** Sums and differences of several one-digit numbers: "Compute 9+8-3-8-4+5.",
reference answer "7". Answered directly, a model must add every operand at once; written step
by step, each line is one small sum, worked out next to its operands, and the running total
carries the work forward:

    <think>
    9+8-3-8-4+5
    [9+8=17]-3-8-4+5
    [17-3=14]-8-4+5
    [14-8=6]-4+5
    [6-4=2]+5
    [2+5=7]
    </think>
    \\boxed{7}

Each line does the first operation of the line above, in brackets next to its operands, and
copies the rest, so every line depends only on the one before it, and each result is computed
from the tokens just before it (docs/toy.md tells which other shapes a tiny model failed to
learn, and why).

Difficulty levels (`LEVELS`) set the number of operands (2, 3, 4, 6, 8, 10) and their digits (one
by default); the base student's corpus covers levels 1-5 only (`BASE_LEVELS`). A minus sign is drawn only when the running total stays non-negative (every
intermediate value is a natural number). The test split is fixed by its seed and held out of
every training set built here (teacher corpus, base corpus, demo problems), by problem text.

**The chain-of-thought writer** (`write_trace`) produces R1-style traces; with probability
`slip_rate` a step's result is off by 1 or 10 and the chain goes on from the wrong value, as a
real slip propagates. A teacher trained on such traces is good but fallible, which gives
rejection filtering something to reject.

**The models.** A character-level tokenizer (`distill.chartok`, ChatML template, `<think>` and
`</think>` as single tokens) and two tiny Qwen2 configs: the teacher (about 2.3M parameters)
learns the traces; the base student (about 0.8M parameters) is trained like a pretrained base:
it answers the bare problem directly, with an empty `<think>` block (easy problems right, long
ones mostly wrong), has seen worked solutions when asked to "think step by step" (a real base
can be prompted into reasoning), rarely reasons unasked, and knows the step facts (see
`base_corpus`). Both are trained by `distill train` from `recipes/toy/*.yaml`; the checkpoints
live in `distill/toy/assets/` (see `build.py`).

Prompts: the user turn is the bare problem (instruction "", see INSTRUCTION), and every stage
of the demo is given that same instruction, so the toy models are sampled, trained, rewarded and
evaluated on exactly the prompt they were built with.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_DIR = ASSETS / "teacher"
BASE_DIR = ASSETS / "base"
QUALITY_FILE = ASSETS / "quality.json"  # measured accuracy of the committed models (build.py)


# --------------------------------------------------------------------------------------------
# the task


@dataclass(frozen=True)
class Level:
    operands: int
    digits: int  # each operand is uniform over 1 .. 10**digits - 1


LEVELS: dict[int, Level] = {
    1: Level(2, 1),
    2: Level(3, 1),
    3: Level(4, 1),
    4: Level(6, 1),
    5: Level(8, 1),
    # Ten steps: only the teacher has seen chains this long. The base's corpus stops at level 5
    # (BASE_LEVELS), so here the students must learn something the base cannot already sample,
    # and no arm of the demo starts near the ceiling (docs/toy.md, "why a sixth level").
    6: Level(10, 1),
}
BASE_LEVELS = (1, 2, 3, 4, 5)  # the levels of the base student's corpus (base_corpus)
TEST_SEED = 1_000_003  # the held-out test split; nothing else is drawn with it
MAX_NEW_TOKENS = 224  # the longest trace (10 operands) is about 195 tokens, a slip adds a few


@dataclass(frozen=True)
class ToyProblem:
    id: str
    level: int
    numbers: tuple[int, ...]
    signs: tuple[str, ...]  # one per number after the first: "+" or "-"

    @property
    def expression(self) -> str:
        text = str(self.numbers[0])
        for sign, number in zip(self.signs, self.numbers[1:]):
            text += f"{sign}{number}"
        return text

    @property
    def problem(self) -> str:
        return f"Compute {self.expression}."

    @property
    def answer(self) -> str:
        return str(self.running_totals()[-1])

    def running_totals(self) -> list[int]:
        totals = [self.numbers[0]]
        for sign, number in zip(self.signs, self.numbers[1:]):
            totals.append(totals[-1] + number if sign == "+" else totals[-1] - number)
        return totals

    def to_json(self) -> dict:
        return {"id": self.id, "problem": self.problem, "answer": self.answer, "level": self.level}


def make_problem(level: int, rng: random.Random, problem_id: str = "") -> ToyProblem:
    spec = LEVELS[level]
    high = 10**spec.digits - 1
    numbers = [rng.randint(1, high)]
    signs: list[str] = []
    total = numbers[0]
    for _ in range(spec.operands - 1):
        number = rng.randint(1, high)
        sign = "-" if number <= total and rng.random() < 0.5 else "+"  # totals stay >= 0
        total = total + number if sign == "+" else total - number
        numbers.append(number)
        signs.append(sign)
    return ToyProblem(problem_id, level, tuple(numbers), tuple(signs))


def heldout_split(per_level: int = 40, levels: Sequence[int] = tuple(LEVELS)) -> list[ToyProblem]:
    """The held-out test split: `per_level` distinct problems of each level, fixed by TEST_SEED
    (the first n of a level are the same whatever `per_level`).

    Level 1 has only a few hundred distinct problems, so the test split is drawn first and every
    training set excludes its problems by text."""
    problems: list[ToyProblem] = []
    for level in levels:
        rng = random.Random(TEST_SEED * 100 + level)  # per level: a smaller split is a prefix of a larger one
        seen: set[str] = set()
        while len(seen) < per_level:
            problem = make_problem(level, rng, f"toy-test-L{level}-{len(seen):04d}")
            if problem.problem not in seen:
                seen.add(problem.problem)
                problems.append(problem)
    return problems


def train_split(
    count: int,
    seed: int,
    levels: Sequence[int] = tuple(LEVELS),
    name: str = "train",
    exclude: Iterable[str] | None = None,
) -> list[ToyProblem]:
    """`count` problems, levels drawn uniformly, none whose text is in `exclude` (default: the
    test split). Duplicates within the split are allowed where a level has few problems."""
    excluded = set(exclude) if exclude is not None else {p.problem for p in heldout_split()}
    rng = random.Random(seed)
    problems = []
    while len(problems) < count:
        level = levels[rng.randrange(len(levels))]
        problem = make_problem(level, rng, f"toy-{name}-{seed}-{len(problems):06d}")
        if problem.problem not in excluded:
            problems.append(problem)
    return problems


def write_problems(problems: Iterable[ToyProblem], path: str | Path) -> Path:
    """JSONL with id, problem, answer, level: what `distill.problems.load_problems` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.to_json()) + "\n")
    return path


def level_of(problem_id: str) -> int | None:
    """The level encoded in a toy test id ("toy-test-L3-0007" -> 3), for per-level breakdowns."""
    for part in problem_id.split("-"):
        if len(part) >= 2 and part[0] == "L" and part[1:].isdigit():
            return int(part[1:])
    return None


# --------------------------------------------------------------------------------------------
# completions: the chain-of-thought writer and the direct answer


def write_trace(problem: ToyProblem, rng: random.Random, slip_rate: float = 0.0) -> tuple[str, bool]:
    """An R1-style completion: the working inside <think>, then the boxed answer.

    The expression, then one line per step that works out the first operation in brackets and
    copies the rest: "9+8-3-8" -> "[9+8=17]-3-8" -> "[17-3=14]-8" -> "[14-8=6]". Each step's
    operands are copied next to its result, so the result is computed from the tokens just
    before it, not from the start of the line above at a distance that changes with the line's
    length (docs/toy.md: how the task got its shape). With probability `slip_rate` per step the
    result is off by 1 or 10 (never negative), and later steps continue from the wrong value, as
    a real slip propagates. Returns (text, slipped)."""
    true_totals = problem.running_totals()
    total = problem.numbers[0]
    slipped = False
    lines = [problem.expression]
    for step, (sign, number) in enumerate(zip(problem.signs, problem.numbers[1:]), start=1):
        result = total + number if sign == "+" else total - number
        if rng.random() < slip_rate:
            # The error is carried by every later value: keep all of them non-negative.
            lowest_later = min(true_totals[step:]) + (result - true_totals[step])
            result += rng.choice([d for d in (1, -1, 10, -10) if lowest_later + d >= 0])
            slipped = True
        rest = "".join(f"{s}{n}" for s, n in zip(problem.signs[step:], problem.numbers[step + 1 :]))
        lines.append(f"[{total}{sign}{number}={result}]{rest}")
        total = result
    return "<think>\n" + "\n".join(lines) + "\n</think>\n" + boxed(total), slipped


def direct_answer(answer: int | str) -> str:
    """What the base student is trained to say: no reasoning, straight to the answer."""
    return "<think>\n</think>\n" + boxed(answer)


def boxed(answer: int | str) -> str:
    return "\\boxed{" + str(answer) + "}"


# --------------------------------------------------------------------------------------------
# prompts: the same user turn the stages render

# The R1 instruction ("Please reason step by step, ...") would be 70 of the ~100 prompt
# characters; the toy world leaves it out (the task never varies) to halve training compute,
# and passes the same empty instruction to every stage.
INSTRUCTION = ""
# What the base student's corpus appends to the problems it shows worked solutions for: the base
# learns to reason when asked to, and answers directly when not (see base_corpus).
COT_CUE = " Think step by step."


def user_turn(problem: str, instruction: str = INSTRUCTION) -> str:
    """The user message for `problem`, by the stages' own renderer (distill.teacher.prompts)."""
    from distill.teacher.prompts import user_message

    return user_message(problem, instruction)


def prompt_messages(problem: str, instruction: str = INSTRUCTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": user_turn(problem, instruction)}]


# --------------------------------------------------------------------------------------------
# tokenizer and models

# Printable ASCII without tabs and form feeds: every prompt and trace of the toy world, and
# anything else a user types, is one token per character (about 100 tokens in all).
ALPHABET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")


def build_tokenizer():
    """The toy models' tokenizer: characters, ChatML specials and <think>/</think> as tokens,
    with the students' `chatml-think` template (its generation prompt opens with "<think>\\n",
    as DeepSeek-R1-Distill's does)."""
    from distill.chartok import build_char_tokenizer
    from distill.students.chat import TEMPLATES

    return build_char_tokenizer(ALPHABET, chat_template=TEMPLATES["chatml-think"].source)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 512


TEACHER_SHAPE = ModelShape(hidden=192, layers=5, heads=4, kv_heads=2, intermediate=576)  # ~2.3M parameters
STUDENT_SHAPE = ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384)  # ~0.8M parameters


def init_model(shape: ModelShape, out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 model dir with the toy tokenizer: what `distill train` starts from."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# training corpora for the two toy models (chat `messages` Parquet, what `distill train` reads)


def teacher_corpus(count: int, seed: int, slip_rate: float) -> list:
    """TraceRecords of the teacher's training set: CoT traces over all levels."""
    from distill.records import TraceRecord

    rng = random.Random(seed + 1)
    records = []
    for problem in train_split(count, seed, name="teacher"):
        text, _ = write_trace(problem, rng, slip_rate)
        records.append(_record(problem, text, "toy-teacher-corpus"))
    assert all(isinstance(r, TraceRecord) for r in records), "teacher corpus holds trace records"
    return records


def base_corpus(
    count: int,
    seed: int,
    step_fraction: float = 0.2,
    cot_fraction: float = 0.5,
    bare_cot_fraction: float = 0.03,
    levels: Sequence[int] = BASE_LEVELS,
) -> list:
    """TraceRecords of the base student's corpus, like a pretraining corpus that holds worked
    solutions but whose default is to answer:

    - `step_fraction`: two-number sums drawn from the running totals of random problems (the
      arithmetic facts a chain of thought uses), answered directly;
    - `cot_fraction`: full correct traces, asked with the cue COT_CUE ("Compute 9+8-3. Think
      step by step.") - the base can reason, when asked to, as a real base can be prompted to;
    - `bare_cot_fraction`: full traces asked as the bare problem (rare: a real base now and then
      works a problem out unprompted, which is what RL-only can reinforce);
    - the rest: direct answers to the bare problem, with an empty `<think>` block.

    Problems come from `levels` (BASE_LEVELS: not the 10-operand level 6, which the base meets
    first in the demo, as a real base meets problems longer than any worked solution it saw)."""
    rng = random.Random(seed + 1)
    excluded = {p.problem for p in heldout_split()}
    records = []
    for index, problem in enumerate(train_split(count, seed, levels=levels, name="base", exclude=excluded)):
        draw = rng.random()
        if draw < step_fraction and len(problem.numbers) > 1:
            # One step of this problem's chain, asked as a problem of its own.
            step = rng.randrange(len(problem.signs))
            total = problem.running_totals()[step]
            pair = ToyProblem(f"toy-base-{seed}-step-{index:06d}", 0, (total, problem.numbers[step + 1]), (problem.signs[step],))
            if pair.problem in excluded:
                continue
            records.append(_record(pair, direct_answer(pair.answer), "toy-base-corpus"))
        elif draw < step_fraction + cot_fraction:
            records.append(_record(problem, write_trace(problem, rng)[0], "toy-base-corpus", instruction=COT_CUE))
        elif draw < step_fraction + cot_fraction + bare_cot_fraction:
            records.append(_record(problem, write_trace(problem, rng)[0], "toy-base-corpus"))
        else:
            records.append(_record(problem, direct_answer(problem.answer), "toy-base-corpus"))
    return records


def _record(problem: ToyProblem, completion: str, source: str, instruction: str = INSTRUCTION):
    from distill.records import TraceRecord

    return TraceRecord(
        problem_id=problem.id,
        sample_idx=0,
        problem=problem.problem,
        answer=problem.answer,
        completion=completion,
        source=source,
        prompt=prompt_messages(problem.problem, instruction),
    )

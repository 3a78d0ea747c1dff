"""The toy world: task, chain-of-thought writer, tokenizer, model shapes and training corpora."""

from __future__ import annotations

import random
import re

import pytest

from distill import toy

STEP = re.compile(r"^(\d+)([+-])(\d+)=(\d+)$")


def evaluate(expression: str) -> int:
    """The value of 'a+b-c...' computed independently of ToyProblem.running_totals."""
    tokens = re.findall(r"[+-]?\d+", expression)
    return sum(int(t) for t in tokens)


def test_levels_set_operand_count_digits_and_answers():
    rng = random.Random(0)
    for level, spec in toy.LEVELS.items():
        for _ in range(200):
            problem = toy.make_problem(level, rng)
            assert len(problem.numbers) == spec.operands
            assert all(1 <= n < 10**spec.digits for n in problem.numbers)
            assert problem.answer == str(evaluate(problem.expression))
            assert min(problem.running_totals()) >= 0, f"{problem.expression}: totals must stay non-negative"
            assert problem.problem == f"Compute {problem.expression}."


def test_heldout_split_is_fixed_distinct_and_absent_from_training_sets():
    first, again = toy.heldout_split(), toy.heldout_split()
    assert [p.problem for p in first] == [p.problem for p in again], "the test split is fixed by its seed"
    small = toy.heldout_split(per_level=5)
    assert {p.id: p.problem for p in small}.items() <= {p.id: p.problem for p in first}.items(), "a smaller split is a prefix"
    assert len({p.problem for p in first}) == len(first) == 40 * len(toy.LEVELS)
    assert {toy.level_of(p.id) for p in first} == set(toy.LEVELS)
    held_out = {p.problem for p in first}
    train = toy.train_split(3000, seed=0)
    assert not held_out & {p.problem for p in train}
    assert not held_out & {r.problem for r in toy.teacher_corpus(500, seed=0, slip_rate=0.1)}
    assert not held_out & {r.problem for r in toy.base_corpus(500, seed=0)}
    assert [p.problem for p in toy.train_split(50, seed=3)] == [p.problem for p in toy.train_split(50, seed=3)]


def test_problems_file_is_read_by_the_shared_loader(tmp_path):
    from distill.problems import load_problems

    problems = toy.heldout_split(per_level=3)
    path = toy.write_problems(problems, tmp_path / "test.jsonl")
    loaded = load_problems(path).problems
    assert [(p.id, p.problem, p.answer) for p in loaded] == [(p.id, p.problem, p.answer) for p in problems]


def parse_trace(text: str) -> tuple[list[tuple[int, str, int, int]], str]:
    """(left, sign, right, result) per step of a trace, and the boxed answer; asserts each line
    brackets the first operation of the line above, with the running value as its left operand,
    and copies the rest unchanged."""
    match = re.fullmatch(r"<think>\n(.*)\n</think>\n\\boxed\{(\d+)\}", text, re.S)
    assert match, f"not an R1-style trace: {text!r}"
    lines = match.group(1).split("\n")
    terms = re.findall(r"([+-]?)(\d+)", lines[0])
    steps = []
    for index, line in enumerate(lines[1:], start=1):
        step = re.fullmatch(r"\[(\d+)([+-])(\d+)=(\d+)\](.*)", line)
        assert step, f"not a step line: {line!r}"
        left, sign, right, result, rest = int(step.group(1)), step.group(2), int(step.group(3)), int(step.group(4)), step.group(5)
        assert left == (int(terms[0][1]) if index == 1 else steps[-1][3]), f"line {line!r} must start from the running value"
        assert (sign, str(right)) == terms[index], f"line {line!r} must take the next operand"
        assert rest == "".join(s + n for s, n in terms[index + 1 :]), f"line {line!r} must copy the rest"
        steps.append((left, sign, right, result))
    return steps, match.group(2)


@pytest.mark.parametrize("slip_rate", [0.0, 0.3, 1.0])
def test_traces_chain_their_steps_and_slips_propagate(slip_rate):
    rng = random.Random(1)
    slipped_any = 0
    for problem in toy.train_split(300, seed=1):
        text, slipped = toy.write_trace(problem, rng, slip_rate)
        steps, boxed = parse_trace(text)
        assert text.startswith("<think>\n" + problem.expression + "\n"), "the working opens with the expression"
        assert len(steps) == len(problem.numbers) - 1
        assert steps[0][0] == problem.numbers[0]
        wrong_steps = 0
        for index, (left, sign, right, result) in enumerate(steps):
            assert (sign, right) == (problem.signs[index], problem.numbers[index + 1])
            wrong_steps += result != (left + right if sign == "+" else left - right)
            assert result >= 0
        assert boxed == str(steps[-1][3]), "the boxed answer is the last step's result"
        assert (wrong_steps > 0) == slipped
        if slip_rate == 0.0:
            assert boxed == problem.answer and not slipped
        if slip_rate == 1.0:
            assert wrong_steps == len(steps)
        slipped_any += slipped
    if 0 < slip_rate < 1:
        assert 0 < slipped_any < 300


def test_tokenizer_is_one_token_per_character_with_think_tags_whole():
    tokenizer = toy.build_tokenizer()
    assert len(tokenizer) < 300, "256 byte symbols, ChatML specials and the think tags"
    problem = toy.heldout_split(per_level=1)[-1]
    text, _ = toy.write_trace(problem, random.Random(0))
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.unk_token_id) == 0
    assert len(ids) == len(text) - len("<think>") - len("</think>") + 2
    rendered = tokenizer.apply_chat_template(
        [*toy.prompt_messages(problem.problem), {"role": "assistant", "content": text}], tokenize=False
    )
    assert rendered.startswith("<|im_start|>user\n" + problem.problem)
    assert rendered.endswith(text + "<|im_end|>\n")


def test_model_shapes_teacher_bigger_than_student(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    counts = {}
    for name, shape in (("teacher", toy.TEACHER_SHAPE), ("student", toy.STUDENT_SHAPE)):
        path = toy.init_model(shape, tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "qwen2"
        assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.chat_template, "the saved tokenizer carries its chat template"
        trace = toy.write_trace(toy.heldout_split(1)[-1], random.Random(0))[0]
        assert tokenizer(trace).input_ids == toy.build_tokenizer()(trace).input_ids, "loads back token for token"
        counts[name] = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < counts["teacher"] < 6_000_000
    assert counts["student"] < counts["teacher"] / 2


def test_corpora_are_chat_records_of_the_right_kind(tmp_path):
    from distill.records import read_traces, write_parquet

    teacher = toy.teacher_corpus(200, seed=0, slip_rate=0.0)
    for record in teacher:
        steps, boxed = parse_trace(record.completion)
        assert boxed == record.answer
        assert record.messages()[0] == {"role": "user", "content": toy.user_turn(record.problem)}
    base = toy.base_corpus(2000, seed=0, step_fraction=0.4, cot_fraction=0.3, bare_cot_fraction=0.05)
    cued = [r for r in base if r.messages()[0]["content"].endswith(toy.COT_CUE)]
    bare = [r for r in base if not r.messages()[0]["content"].endswith(toy.COT_CUE)]
    for record in cued:  # worked solutions, asked for: correct traces
        assert parse_trace(record.completion)[1] == record.answer
        assert record.messages()[0]["content"] == record.problem + toy.COT_CUE
    assert 0.25 < len(cued) / len(base) < 0.35
    bare_traces = [r for r in bare if r.completion != toy.direct_answer(r.answer)]
    assert all(parse_trace(r.completion)[1] == r.answer for r in bare_traces), "unasked, the base either answers or reasons correctly"
    assert 0.02 < len(bare_traces) / len(base) < 0.08, "the base rarely reasons unasked"
    direct = [r for r in bare if r.completion == toy.direct_answer(r.answer)]
    assert all(r.messages()[0]["content"] == toy.user_turn(r.problem) for r in bare)
    two_number = [r for r in direct if r.problem.count("+") + r.problem.count("-") == 1]
    assert 0.35 < len(two_number) / len(base) < 0.6, "two-number sums (steps, plus level 1) are a large share"
    assert max(int(re.findall(r"\d+", r.problem)[0]) for r in two_number) > 20, "steps start from running totals"
    path = tmp_path / "teacher.parquet"
    assert write_parquet(teacher, path) == len(teacher)
    again = read_traces(path).records
    assert [r.completion for r in again] == [r.completion for r in teacher]

"""distill onpolicy: the per-token reverse-KL advantage, its loss gradient, and the stage end to end.

The models: tiny Qwen2 students and teachers built here over one character-level tokenizer (so
the teacher can score the student's tokens), and for the learning test the toy world's committed
base student and teacher (distill/toy/assets). The teacher is the real hf engine
(`Engine.score`); nothing is a stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import load_config

PROBLEMS = {"1+1": "2", "2+1": "3", "1+2": "3", "2+2": "4", "3+1": "4", "1+3": "4", "3+2": "5", "2+3": "5"}
TIMING = ("time", "rollout_s", "update_s", "teacher_s", "student_logprobs_s")


def build_model(out: Path, tokenizer, seed: int, spread: float = 0.02) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=spread,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        )
    ).save_pretrained(out)  # fmt: skip
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A hidden-32 model runs faster on one thread than on two busy cores (as test_grpo)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(student dir, teacher dir, problems file): one tokenizer, two different models."""
    from distill.chartok import build_char_tokenizer

    root = tmp_path_factory.mktemp("onpolicy-task")
    tokenizer = build_char_tokenizer("0123456789+\n", words=("<think>", "</think>", *(f"\\boxed{{{d}}}" for d in range(10))))
    student = build_model(root / "student", tokenizer, seed=0)
    teacher = build_model(root / "teacher", tokenizer, seed=1, spread=0.3)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": q, "answer": a}) + "\n" for i, (q, a) in enumerate(PROBLEMS.items())))
    return student, teacher, data


def config(task, out: Path, **overrides):
    from distill.students.onpolicy import OnPolicyConfig

    student, teacher, data = task
    values = dict(
        student=str(student), teacher=str(teacher), data=str(data), instruction=None, group_size=2, prompts_per_step=4,
        max_tokens=6, steps=8, lr=0.01, micro_batch_size=8, save_every=4, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return load_config(OnPolicyConfig, overrides=[f"{k}={v}" for k, v in values.items()], flags={"out": str(out)}).config


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# the arithmetic, against hand-computed values


def test_reverse_kl_advantage_by_hand():
    import torch

    from distill.students.rl import reverse_kl_advantages

    student = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, reverse_kl = reverse_kl_advantages(student, teacher, mask, coef=2.0)
    # log p_s - log p_t: row 0: 0.5, -1.0, 0.0; row 1: 0.3, 0.0, (masked)
    assert torch.allclose(reverse_kl, torch.tensor([[0.5, -1.0, 0.0], [0.3, 0.0, 0.0]]))
    assert torch.allclose(advantages, torch.tensor([[-1.0, 2.0, 0.0], [-0.6, 0.0, 0.0]]))
    # discounted (the cookbook's kl_discount_factor): A_t = a_t + gamma * A_{t+1}, gamma = 0.5
    discounted, _ = reverse_kl_advantages(student, teacher, mask, coef=2.0, discount=0.5)
    # row 0: a = (-1, 2, 0): A_2 = 0, A_1 = 2, A_0 = -1 + 0.5 * 2 = 0; row 1: a = (-0.6, 0): A = (-0.6, 0, 0)
    assert torch.allclose(discounted, torch.tensor([[0.0, 2.0, 0.0], [-0.6, 0.0, 0.0]]))


def test_a_teacher_equal_to_the_student_gives_zero_advantage():
    import torch

    from distill.students.rl import reverse_kl_advantages

    logprobs = torch.log(torch.tensor([[0.2, 0.7, 0.9], [0.5, 0.5, 0.1]]))
    advantages, reverse_kl = reverse_kl_advantages(logprobs, logprobs.clone(), torch.ones(2, 3), discount=0.9)
    assert torch.equal(advantages, torch.zeros(2, 3)) and torch.equal(reverse_kl, torch.zeros(2, 3))


def test_per_token_advantages_give_the_hand_computed_gradient():
    """loss = sum_i w_i sum_t -ratio_it * A_it * mask_it; at ratio 1, d loss / d logp_it = -w_i A_it mask_it."""
    import torch

    from distill.students.rl import policy_loss

    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -0.2]], requires_grad=True)
    advantages = torch.tensor([[-1.0, 2.0, 0.5], [0.25, -0.5, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([0.2, 0.2])  # token aggregation: 1 / 5 loss tokens
    loss, stats = policy_loss(logprobs, logprobs.detach(), advantages, mask, weights, epsilon_low=0.2, epsilon_high=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-0.2 * (-1.0 + 2.0 + 0.5 + 0.25 - 0.5))
    expected = torch.tensor([[0.2, -0.4, -0.1], [-0.05, 0.1, 0.0]])
    assert torch.allclose(logprobs.grad, expected)
    assert stats.tokens == 5 and stats.clipped == 0
    # away from ratio 1 the clip acts per token, on each token's own advantage: ratio e^0.5 > 1.2
    # with A > 0 is clipped (no gradient), with A < 0 it is not
    old = logprobs.detach() - 0.5
    logprobs.grad = None
    _, stats = policy_loss(logprobs, old, advantages, mask, weights, epsilon_low=0.2, epsilon_high=0.2)
    assert stats.clipped_high == 3  # the three unmasked tokens with A > 0


def test_per_sequence_advantages_are_unchanged():
    """GRPO's (B,) advantages give the same loss as the same value repeated over (B, T)."""
    import torch

    from distill.students.rl import policy_loss

    logprobs = torch.tensor([[-1.0, -2.0], [-0.3, -0.7]])
    old = logprobs - torch.tensor([[0.1, -0.3], [0.05, 0.4]])
    mask, weights = torch.ones(2, 2), torch.tensor([0.5, 0.25])
    per_sequence, _ = policy_loss(logprobs, old, torch.tensor([1.5, -0.5]), mask, weights, epsilon_low=0.2, epsilon_high=0.28)
    per_token, _ = policy_loss(logprobs, old, torch.tensor([[1.5, 1.5], [-0.5, -0.5]]), mask, weights, epsilon_low=0.2, epsilon_high=0.28)
    assert torch.allclose(per_sequence, per_token)


# --------------------------------------------------------------------------------------------
# the tokenizer check


def test_tokenizer_mismatch_names_the_first_difference():
    from distill.chartok import build_char_tokenizer
    from distill.students.onpolicy import tokenizer_mismatch

    base = build_char_tokenizer("0123456789+\n")
    assert tokenizer_mismatch(base, build_char_tokenizer("0123456789+\n")) is None
    assert "is not in the teacher's vocabulary" in tokenizer_mismatch(build_char_tokenizer("0123456789+\n", words=("<think>", "</think>", "<x>")), base)
    assert "is not in the student's vocabulary" in tokenizer_mismatch(base, build_char_tokenizer("0123456789+\n", words=("<think>", "</think>", "<x>")))
    swapped = build_char_tokenizer("0123456789+\n", words=("</think>", "<think>"))
    assert "is id" in tokenizer_mismatch(base, swapped)


def test_real_tokenizers_of_two_families_are_told_apart(shared_data):
    from transformers import AutoTokenizer

    from distill.students.onpolicy import tokenizer_mismatch

    qwen = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2.5-instruct")
    llama = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "llama-3-instruct")
    assert tokenizer_mismatch(qwen, qwen) is None
    assert "tokens; the student's" in tokenizer_mismatch(qwen, llama)


# --------------------------------------------------------------------------------------------
# the stage end to end


def test_a_short_run_lowers_the_reverse_kl_to_the_teacher(tmp_path):
    """The toy world's base student (answers directly) against its teacher (reasons R1-style):
    one tokenizer, two trained models whose distributions differ. (Two randomly initialised
    tiny models are no test of learning: over a 262-token vocabulary, a near-uniform student
    needs far more than a few steps of 8 samples to find a random teacher's preferences.)"""
    import random

    from distill import toy
    from distill.students.onpolicy import run

    data = toy.write_problems([toy.make_problem(level, random.Random(i), f"p{i}") for i, level in enumerate([2, 3, 4] * 8)], tmp_path / "problems.jsonl")
    final = run(config((toy.BASE_DIR, toy.TEACHER_DIR, data), tmp_path / "run", steps=4, max_tokens=32, lr=1e-3, instruction="", chat_template="model"))
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["teacher_scored_tokens"] == row["trained_tokens"] == round(row["completions"] * row["completion_length"])
        assert row["teacher_s"] >= 0 and row["reverse_kl"] is not None
    first, last = rows[0]["reverse_kl"], (rows[2]["reverse_kl"] + rows[3]["reverse_kl"]) / 2
    assert first > 1.0, f"the base should start far from the teacher (reverse KL {first:.3f})"
    assert last < 0.6 * first, f"reverse KL went from {first:.3f} to {last:.3f}"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {k: saved[k] for k in final} == final and saved["stage"] == "onpolicy"
    assert final["reverse_kl_first"] == first
    assert final["reverse_kl_last10"] == pytest.approx(sum(r["reverse_kl"] for r in rows) / 4)
    assert final["train_tokens"] == sum(r["trained_tokens"] for r in rows)
    assert final["teacher_scored_tokens"] == sum(r["teacher_scored_tokens"] for r in rows)
    assert (tmp_path / "run" / "onpolicy.log").is_file() and (tmp_path / "run" / "model" / "config.json").is_file()


def test_a_teacher_equal_to_the_student_gives_no_signal(task, tmp_path):
    """Zero advantage, so zero gradient (up to float round-off between the trainer's and the
    engine's forward passes). Adam turns any non-zero gradient, however small, into a step of
    size ~lr, so the check is on the gradient the update receives, not on the weights."""
    from distill.students.onpolicy import run

    student, _, data = task
    run(config((student, student, data), tmp_path / "same", steps=2, group_size=1))
    for row in metrics(tmp_path / "same"):
        assert abs(row["reverse_kl"]) < 1e-5, row["reverse_kl"]
        assert row["grad_norm"] < 1e-5, row["grad_norm"]
        assert row["groups_trained"] == 4, "with reward_weight=0 every group trains, even a group of one"


def test_the_reward_can_be_added_with_a_weight(task, tmp_path):
    from distill.students.onpolicy import run

    final = run(config(task, tmp_path / "mixed", steps=2, reward_weight=0.5, mu=2, minibatches=2))
    rows = metrics(tmp_path / "mixed")
    assert all(r["optimizer_steps"] == 4 and r["reward_mean"] is not None for r in rows)
    assert rows[-1]["kl_old"] > 0, "the update reuses the sampling policy's log-probs as the old ones"
    assert final["reward_weight"] == 0.5


def test_kill_and_resume_follows_the_same_trajectory(task, tmp_path, monkeypatch):
    """As test_grpo's: killed after step 5 was logged (last checkpoint: step 4), resumed."""
    import torch
    from safetensors.torch import load_file

    from distill.rundir import RunDir, step_rows
    from distill.students.onpolicy import run

    settings = dict(steps=6, save_every=2, mu=2, minibatches=2, micro_batch_size=4)
    run(config(task, tmp_path / "straight", **settings))

    original = RunDir.log_metrics

    def crash_after_step_5(self, record):
        original(self, record)
        if record["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log_metrics", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(config(task, tmp_path / "killed", **settings))
    monkeypatch.setattr(RunDir, "log_metrics", original)
    run(config(task, tmp_path / "killed", **settings))

    straight, resumed = metrics(tmp_path / "straight"), step_rows(tmp_path / "killed")
    assert [(r.get("event"), r["step"]) for r in metrics(tmp_path / "killed")][4:] == [(None, 5), ("resume", 4), (None, 5), (None, 6)]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    final = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert final["reverse_kl_first"] == straight[0]["reverse_kl"], "the first step's figure survives the resume"
    assert final["teacher_scored_tokens"] == sum(r["teacher_scored_tokens"] for r in straight)
    weights_a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    weights_b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


# --------------------------------------------------------------------------------------------
# the command and its refusals


def test_cli_runs_and_prints_the_model_dir(task, tmp_path, run_cli):
    student, teacher, data = task
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        "onpolicy", "--student", str(student), "--teacher", str(teacher), "--data", str(data), "--out", str(out),
        "steps=1", "group_size=2", "prompts_per_step=2", "max_tokens=3", "instruction=null",
    )  # fmt: skip
    assert code == 0, stderr
    assert Path(stdout.strip()) == out / "model"
    assert f"distill onpolicy: {student} from teacher {teacher} on {data}" in stderr
    assert json.loads((out / "metrics.json").read_text())["teacher"] == str(teacher)


def one_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("error: ")


def test_a_teacher_with_another_tokenizer_is_refused_before_any_model_loads(task, tmp_path, run_cli):
    from distill.chartok import build_char_tokenizer

    _, teacher, data = task
    # a student directory whose weights are missing: had the stage loaded a model, it would fail otherwise
    student = tmp_path / "student"
    other = build_char_tokenizer("0123456789+-\n")
    build_model(student, other, seed=0)
    (student / "model.safetensors").unlink()
    out = tmp_path / "run"
    code, _, err = run_cli("onpolicy", "--student", str(student), "--teacher", str(teacher), "--data", str(data), "--out", str(out))
    message = one_error(code, err)
    assert message.startswith(f"teacher {teacher} does not tokenize as student {student} does (")
    assert "cross-tokenizer distillation is not supported" in message
    assert not out.exists(), "a refused run leaves no run directory"


def test_bad_settings_are_one_line(task, tmp_path, run_cli):
    student, teacher, data = task
    base = ("onpolicy", "--student", str(student), "--data", str(data))
    code, _, err = run_cli(*base, "--out", str(tmp_path / "a"))
    assert "missing required value 'teacher'" in one_error(code, err)
    code, _, err = run_cli(*base, "--teacher", str(teacher), "--out", str(tmp_path / "b"), "reward_weight=1", "group_size=1")
    assert "reward_weight > 0 needs group_size >= 2" in one_error(code, err)
    code, _, err = run_cli(*base, "--teacher", "not-a-model", "--out", str(tmp_path / "c"))
    assert one_error(code, err) == "teacher 'not-a-model' is neither an existing model directory nor a hub id (org/name)"
    code, _, err = run_cli(*base, "--teacher", str(teacher), "--out", str(tmp_path / "d"), "variant=dapo")
    assert "on-policy distillation learns from every group" in one_error(code, err)
    code, _, err = run_cli(*base, "--teacher", str(teacher), "--out", str(tmp_path / "e"), "kl_discount=1")
    assert "kl_discount must be in [0, 1)" in one_error(code, err)
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_problems_without_answers_are_enough_without_a_reward(task, tmp_path):
    from distill.students.onpolicy import run

    student, teacher, _ = task
    data = tmp_path / "no_answers.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": q, "answer": None}) + "\n" for i, q in enumerate(PROBLEMS)))
    final = run(config((student, teacher, data), tmp_path / "run", steps=1))
    assert final["unverifiable_this_session"] == 8 and final["reverse_kl_last10"] is not None

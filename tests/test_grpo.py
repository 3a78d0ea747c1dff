"""distill grpo end to end on a task a tiny model can partly solve.

The task: a problem such as "2+1" whose answer the policy must write as one token, `\\boxed{3}`
(each `\\boxed{d}` is a single word of a character-level tokenizer of about 30 tokens, so a
randomly initialised model hits the right one a few times in a group of 8, and the reward is
reachable from the first step). The reward is the real one: the shared verifier grades the
completion against the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.config import load_config

ANSWER_WORDS = tuple(f"\\boxed{{{d}}}" for d in range(10))
PROBLEMS = {"1+1": "2", "2+1": "3", "1+2": "3", "2+2": "4", "3+1": "4", "1+3": "4", "3+2": "5", "2+3": "5"}


def build_task(root: Path) -> tuple[Path, Path]:
    """A tiny Qwen2 policy over a small character vocabulary, and its problems file."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.chartok import build_char_tokenizer

    tokenizer = build_char_tokenizer("0123456789+\n", words=("<think>", "</think>", *ANSWER_WORDS))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        )
    )
    model_dir = root / "policy"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": q, "answer": a}) + "\n" for i, (q, a) in enumerate(PROBLEMS.items())))
    return model_dir, data


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A hidden-32 model runs ~5x faster on one thread than on two busy cores (oversubscription)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("grpo-task"))


def config(task, out: Path, **overrides):
    from distill.students.grpo import GRPOConfig

    model_dir, data = task
    values = dict(
        student=str(model_dir), data=str(data), out=out, instruction=None,
        group_size=8, prompts_per_step=4, max_tokens=2, steps=20, lr=0.02,
        micro_batch_size=16, save_every=10, seed=0,
    )
    values.update(overrides)
    flat = [f"{k}={v}" for k, v in values.items() if k not in ("out",)]
    return load_config(GRPOConfig, overrides=flat, flags={"out": str(out)}).config


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_few_dozen_steps_raise_the_mean_reward(task, tmp_path):
    from distill.students.grpo import run

    final = run(config(task, tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 21))
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last > first + 0.15, f"mean reward went from {first:.3f} to {last:.3f}"
    # every figure the issue asks for is there on each step
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "completion_length", "truncation_rate",
                "kl_old", "clip_fraction", "entropy", "rollout_s", "update_s"):
        assert rows[-1][key] is not None, key
    assert final["accuracy_last10"] > rows[0]["accuracy"]
    # the final model is a Hugging Face directory that loads
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final["model_dir"]) is not None


TIMING = ("time", "rollout_s", "update_s")


def test_kill_and_resume_follows_the_same_trajectory(task, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from distill.rundir import RunDir
    from distill.students.grpo import run

    settings = dict(steps=6, save_every=2, mu=2, minibatches=2, micro_batch_size=8)
    run(config(task, tmp_path / "straight", **settings))

    # the same run, killed after step 5 was logged (its last checkpoint is step 4), then resumed
    original = RunDir.log_metrics

    def crash_after_step_5(self, record):
        original(self, record)
        if record["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "log_metrics", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(config(task, tmp_path / "killed", **settings))
    monkeypatch.setattr(RunDir, "log_metrics", original)
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    run(config(task, tmp_path / "killed", **settings))

    from distill.rundir import step_rows

    straight, resumed = metrics(tmp_path / "straight"), step_rows(tmp_path / "killed")
    # append-only, as distill train: the line of the first step 5 stays, a marker notes the resume
    # from step 4, and the redone step 5 counts once (by its last record)
    assert [(r.get("event"), r["step"]) for r in metrics(tmp_path / "killed")][4:] == [(None, 5), ("resume", 4), (None, 5), (None, 6)]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    # the same command once more: nothing left to do, the figures stand
    again = run(config(task, tmp_path / "killed", **settings))
    assert again == json.loads((tmp_path / "killed" / "metrics.json").read_text())
    # the compute ledger counts every step once across the resume; mu=2 epochs of forward +
    # backward, one no-grad pass (old log-probs, several optimizer steps per rollout)
    ledger = again["compute"]
    assert ledger == json.loads((tmp_path / "straight" / "metrics.json").read_text())["compute"]
    assert ledger["student_tokens_generated"] == sum(r["generated_tokens"] for r in resumed) > 0 and ledger["teacher_tokens_scored"] == 0
    assert ledger["student_tokens_forward_backward"] == 2 * ledger["student_tokens_no_grad"] > 0
    n = ledger["student_params"]
    assert ledger["flops_total"] == 2 * n * (ledger["student_prompt_tokens"] + ledger["student_tokens_generated"] + ledger["student_tokens_no_grad"]) \
        + 6 * n * ledger["student_tokens_forward_backward"]
    assert len(metrics(tmp_path / "killed")) == 8, "a finished run rerun logs nothing more"
    weights_a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    weights_b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(variant="dapo", mu=2, minibatches=2),
        dict(variant="dapo", overlong="mask", max_tokens=3),
        dict(variant="dr_grpo", beta=0.1),
        dict(variant="grpo", beta=0.1, lora=True, lora_r=4),
    ],
    ids=["dapo-mu2", "dapo-overlong-mask", "dr_grpo-kl", "grpo-lora-kl"],
)
def test_variants_run_and_report_their_figures(task, tmp_path, overrides):
    from distill.students.grpo import run

    run(config(task, tmp_path / "run", steps=2, lr=0.01, **overrides))
    rows = metrics(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        if overrides.get("variant") == "dapo":
            # dynamic sampling: only groups with different rewards are trained
            assert row["groups_trained"] <= 4 and row["groups"] >= 4
        if row["groups_trained"] == 0:
            assert row["optimizer_steps"] == 0
            continue
        if overrides.get("mu"):
            assert row["optimizer_steps"] == overrides["mu"] * overrides["minibatches"]
            assert row["kl_old"] > 0, "after the first update the policy differs from the one that sampled"
        if overrides.get("beta"):
            assert row["kl_ref"] is not None and row["kl_ref"] >= 0
        else:
            assert row["kl_ref"] is None
        if overrides.get("overlong") == "mask":
            # truncated completions keep their reward but train no token
            assert row["trained_tokens"] < row["completions"] * row["completion_length"] or row["truncation_rate"] == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_cli_runs_a_recipe_and_prints_the_model_dir(task, tmp_path, run_cli):
    model_dir, data = task
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"# distill grpo --recipe {recipe}\ngroup_size: 4\nprompts_per_step: 2\nmax_tokens: 2\ninstruction: null\n")
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        "grpo", "--student", str(model_dir), "--data", str(data), "--out", str(out), "--variant", "dr_grpo",
        "--recipe", str(recipe), "steps=1", "micro_batch_size=8",
    )
    assert code == 0, stderr
    assert Path(stdout.strip()).is_dir() and json.loads((out / "metrics.json").read_text())["variant"] == "dr_grpo"
    assert "variant: dr_grpo" in (out / "config.yaml").read_text()


def test_cli_errors_are_one_line(task, tmp_path, run_cli):
    model_dir, _ = task
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"id": "a", "problem": "1+1", "answer": null}\n{"id": "b", "problem": "1+2", "answer": " "}\n')
    code, _, stderr = run_cli("grpo", "--student", str(model_dir), "--data", str(no_answers), "--out", str(tmp_path / "a"))
    assert code == 2 and "no problem has a reference answer" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli("grpo", "--student", str(model_dir), "--data", str(no_answers), "--out", str(tmp_path / "b"), "group_sise=4")
    assert code == 2 and "did you mean 'group_size'" in stderr
    code, _, stderr = run_cli("grpo", "--student", str(model_dir), "--data", str(no_answers), "--out", str(tmp_path / "c"), "group_size=1")
    assert code == 2 and "group_size must be at least 2" in stderr


def test_problems_without_a_reference_are_skipped_and_counted_not_rewarded_zero(task, tmp_path):
    from distill.students.grpo import run

    model_dir, data = task
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data.read_text() + '{"id": "x", "problem": "9+9", "answer": null}\n{"id": "y", "problem": "8+9", "answer": ""}\n')
    run(config((model_dir, mixed), tmp_path / "run", steps=1, prompts_per_step=10))
    (row,) = metrics(tmp_path / "run")
    assert row["unverifiable"] == 2 * 8 and row["completions"] == 10 * 8
    assert row["groups_trained"] <= 8, "the two groups without a reference train nothing"
    # the reward mean is over the 64 graded completions only
    assert row["reward_mean"] is not None


@pytest.fixture
def base_with_a_base_models_eos(tmp_path):
    """The toy base student with a base model's EOS (`<|endoftext|>`, as Qwen2.5 base models
    ship) instead of the chat template's end of turn (`<|im_end|>`), which it still writes."""
    import shutil

    from distill import toy

    model = tmp_path / "base"
    shutil.copytree(toy.BASE_DIR, model)
    for name, key, value in (("config.json", "eos_token_id", 1), ("generation_config.json", "eos_token_id", [1]),
                             ("tokenizer_config.json", "eos_token", "<|endoftext|>")):  # fmt: skip
        settings = json.loads((model / name).read_text())
        settings[key] = value
        (model / name).write_text(json.dumps(settings))
    return model


def hf_logprobs(model_dir, ids: list[int], rope_theta: float) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 under the Hugging Face model, at temperature 1."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = AutoConfig.from_pretrained(model_dir)
    settings.rope_parameters = {**settings.rope_parameters, "rope_theta": rope_theta}
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=settings, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)
    return [logprobs[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_colocated_vllm_samples_from_the_policy_after_every_update(base_with_a_base_models_eos, tmp_path, monkeypatch):
    """The real vLLM, colocated: after the last update the engine's log-probs of a fixed
    completion are the trained policy's (weights synced every step, RoPE override included),
    and rollouts stop at the chat template's end of turn although the model's EOS is another."""
    import socket

    from conftest import SharedEngine, real_vllm

    import distill.engines
    from distill import toy
    from distill.students.grpo import run

    vllm = real_vllm()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # what the colocated engine sets in this process, undone after the test
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port)), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):  # fmt: skip
        monkeypatch.setenv(name, value)
    engines = []
    build = distill.engines.make_engine

    def keep(name, model=None, **options):  # the stage closes it; the test reads it first
        engines.append(build(name, model, **options))
        return SharedEngine(engines[-1], str(model))

    monkeypatch.setattr(distill.engines, "make_engine", keep)
    data = toy.write_problems(toy.train_split(8, seed=0, name="grpo", levels=(1, 2)), tmp_path / "problems.jsonl")
    theta = 20000.0  # not the checkpoint's 10000: the engine must sample with the trainer's RoPE
    cfg = config((base_with_a_base_models_eos, data), tmp_path / "run", engine="vllm", steps=2, group_size=4, prompts_per_step=2,
                 max_tokens=toy.MAX_NEW_TOKENS, lr=1e-3, instruction="", chat_template="model", end_of_turn="<|im_end|>",
                 rope_theta=theta, micro_batch_size=8, engine_options="{extra: {enforce_eager: true}}")  # fmt: skip
    try:
        run(cfg)
        (engine,) = engines
        llm = engine._llm
        assert llm.llm_engine.model_config.hf_config.rope_parameters["rope_theta"] == theta
        tokenizer = engine.tokenizer
        text = "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n<think>\n3+4=7\n</think>\n\\boxed{7}<|im_end|>"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        (output,) = llm.generate([{"prompt_token_ids": ids}], vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)
        sampled = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:])]
    finally:
        for engine in engines:
            engine.close()
    trained = hf_logprobs(tmp_path / "run" / "model", ids, theta)
    base = hf_logprobs(base_with_a_base_models_eos, ids, theta)
    assert max(abs(a - b) for a, b in zip(sampled, trained)) < 2e-3, "the engine samples from the trained policy"
    assert max(abs(a - b) for a, b in zip(base, trained)) > 2e-2, "the updates changed the policy enough to tell"
    rows = metrics(tmp_path / "run")
    assert [r["completions"] for r in rows] == [8, 8]
    assert all(r["truncation_rate"] < 0.5 for r in rows), "rollouts stop at <|im_end|>, not at max_tokens"


@pytest.mark.slow
def test_two_processes_under_fsdp_take_the_same_steps_as_one(task, tmp_path):
    """torchrun with 2 CPU processes (gloo, FSDP2): each rank rolls out half the prompts and
    trains on them, with normalisers over both ranks; the figures match a single process."""
    import os
    import subprocess
    import sys

    from distill.students.grpo import run

    model_dir, data = task
    settings = dict(steps=2, variant="dr_grpo", micro_batch_size=4, verifier_workers=1)
    run(config(task, tmp_path / "one", **settings))
    flags = [f"{k}={v}" for k, v in dict(instruction="null", group_size=8, prompts_per_step=4, max_tokens=2, lr=0.02, seed=0, **settings).items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distill.cli",
               "grpo", "--student", str(model_dir), "--data", str(data), "--out", str(tmp_path / "two"), *flags]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    for one, two in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("reward_mean", "accuracy", "completion_length", "groups_trained", "trained_tokens", "grad_norm", "entropy"):
            assert one[key] == pytest.approx(two[key], rel=1e-5), key


def test_dropout_is_off_but_the_model_stays_in_training_mode(task):
    """Activation checkpointing works only in training mode; the ratio needs no dropout."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students.grpo import _disable_dropout
    from distill.students.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(task[0], attention_dropout=0.5)
    _disable_dropout(model)
    assert model.training
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    assert torch.equal(token_logprobs(model, ids), token_logprobs(model, ids))

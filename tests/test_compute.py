"""The compute ledger (distill.compute): parameter counts and FLOPs against hand-computed
values, and `distill compare` adding them up along each model's lineage."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_compare import make_eval_run

from distill import compute
from distill.compare import CompareConfig, cost_of, lineage, run
from distill.rundir import write_json

# tests/conftest.py's tiny shape: hidden 32, 2 layers, MLP 64, 4 heads of 8, 2 key-value heads.
# Per layer: q 32x32 (+32 bias), k and v 32x16 (+16 bias each; Qwen2 only), o 32x32, the MLP's
# gate, up and down 3 x 32x64, two norms 2 x 32; then the final norm 32; the embedding 32 x vocab
# is the LM head (tied) and is counted once, as the head.
QWEN_LAYER = (1024 + 32) + 2 * (512 + 16) + 1024 + 3 * 2048 + 64  # 9344
LLAMA_LAYER = 1024 + 2 * 512 + 1024 + 3 * 2048 + 64  # 9280
VOCAB = 100


def tiny(family: str, tied: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**shape)) if family == "qwen" else LlamaForCausalLM(LlamaConfig(**shape))


@pytest.mark.parametrize("family,layer", [("qwen", QWEN_LAYER), ("llama", LLAMA_LAYER)])
def test_parameter_counts_by_hand(family, layer, tmp_path):
    expected = 2 * layer + 32 + 32 * VOCAB  # the input embedding lookup is not in N; the head is
    for tied in (True, False):
        model = tiny(family, tied)
        counts = compute.module_params(model)
        total = sum(p.numel() for p in model.parameters())
        assert counts["params"] == expected and counts["trainable"] == total, (family, tied)
        assert total == expected + (0 if tied else 32 * VOCAB)  # untied: a second vocab x hidden matrix
        model.save_pretrained(tmp_path / f"{family}-{tied}")
        assert compute.weights_params(tmp_path / f"{family}-{tied}") == expected, "the weights' headers say the same"
    assert compute.weights_params(tmp_path / "nothing-here") is None and compute.weights_params("no-such/model-anywhere") is None
    # an adapter exported apart (merge_lora=false): its base's N and the adapter's own parameters
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(tiny(family), LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.peft_config["default"].base_model_name_or_path = str(tmp_path / f"{family}-True")
    adapted.save_pretrained(tmp_path / f"{family}-adapter")
    lora = 2 * (2 * 32 + 32 * 2)  # 2 layers of q_proj: A (r=2 x 32) and B (32 x 2)
    assert compute.weights_params(tmp_path / f"{family}-adapter") == expected + lora
    assert compute.module_params(adapted) == {"params": expected + lora, "trainable": lora}


def test_flops_by_hand():
    n = 2 * QWEN_LAYER + 32 + 32 * VOCAB  # 21920
    generated = compute.block("training", teacher_params=n, teacher_prompt_tokens=10, teacher_tokens_generated=30)
    assert generated["flops"]["teacher_generation"] == 2 * 21920 * 40 == 1_753_600 == generated["flops_total"]
    trained = compute.block("training", student_params=n, student_tokens_trained=60, student_tokens_forward_backward=100)
    assert trained["flops_total"] == 6 * 21920 * 100 == 13_152_000  # every token of the sequences, not only the 60 with a loss
    lora = compute.block("training", student_params=n, student_trainable_params=1000, student_tokens_forward_backward=100)
    assert lora["flops_total"] == (4 * 21920 + 2 * 1000) * 100 == 8_968_000  # no weight gradients for the frozen base
    rl = compute.block("training", teacher_params=50_000, student_params=n, teacher_tokens_scored=60, student_prompt_tokens=20,
                       student_tokens_generated=40, student_tokens_forward_backward=120, student_tokens_no_grad=60)  # fmt: skip
    assert rl["flops"] == {"teacher_generation": 0.0, "teacher_scoring": 6_000_000.0, "student_generation": 2_630_400.0,
                           "student_training": 15_782_400.0, "student_no_grad": 2_630_400.0}  # fmt: skip
    assert rl["flops_total"] == 27_043_200
    # a part with tokens but no N is unknown, and so is the total; a part with no tokens costs 0
    assert compute.block("training", student_params=n, teacher_tokens_scored=5)["flops_total"] is None
    assert compute.block("training", student_params=n, student_tokens_forward_backward=1)["flops"]["teacher_scoring"] == 0.0
    assert compute.training_flops(compute.block("inference", student_params=n, student_tokens_generated=9)) == 0.0
    assert (compute.human(3.14e15), compute.human(0), compute.human(None)) == ("3.1e15", "0", "-")


def test_a_mixture_of_experts_counts_the_experts_active_per_token(tmp_path):
    import torch
    from safetensors.torch import save_file

    square = lambda: torch.zeros(4, 4)  # noqa: E731
    tensors = {"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.attn.weight": square(),
               "model.layers.0.mlp.shared_experts.weight": square(), "lm_head.weight": torch.zeros(10, 4),
               "model.layers.1.mtp.weight": square()}  # layer 1 >= num_hidden_layers: multi-token prediction, unused to sample
    tensors.update({f"model.layers.0.mlp.experts.{i}.weight": square() for i in range(4)})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "n_routed_experts": 4, "num_experts_per_tok": 1}))
    assert compute.weights_params(tmp_path) == 16 + 16 + 4 * 16 // 4 + 40


class FakeRun:
    """What rl_block reads of a RunDir: the step records."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def step_rows(self):
        from distill.rundir import step_rows

        return step_rows(self.path)


def write_steps(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with (path / "metrics.jsonl").open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_onpolicy_gets_grpo_s_ledger_with_the_teacher_s_scoring(tmp_path):
    """onpolicy shares grpo's final metrics: a step record's teacher_scored_tokens and the
    prompts ahead of them are the teacher's forward, counted once per step across a resume; N
    from `teacher_params` or cfg.teacher."""
    student, teacher = tiny("qwen"), tiny("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    step = {"prompt_tokens": 20, "generated_tokens": 40, "trained_tokens": 35, "forward_backward_tokens": 60, "no_grad_tokens": 0,
            "teacher_scored_tokens": 60}  # fmt: skip
    write_steps(tmp_path / "run", [{"step": 1, **step}, {"step": 2, **step}, {"event": "resume", "step": 1}, {"step": 2, **step}])
    ledger = compute.rl_block(FakeRun(tmp_path / "run"), SimpleNamespace(teacher=str(tmp_path / "teacher")), student)
    n, nt = 2 * QWEN_LAYER + 32 + 32 * VOCAB, 2 * LLAMA_LAYER + 32 + 32 * VOCAB
    assert (ledger["student_params"], ledger["teacher_params"], ledger["teacher_tokens_scored"]) == (n, nt, 2 * (60 + 20))
    assert ledger["flops_total"] == 2 * nt * 160 + 2 * n * 120 + 6 * n * 120
    given = compute.rl_block(FakeRun(tmp_path / "run"), SimpleNamespace(teacher="served-elsewhere"), student, {"teacher_params": 1000})
    assert given["teacher_params"] == 1000 and given["flops"]["teacher_scoring"] == 2 * 1000 * 160
    unknown = compute.rl_block(FakeRun(tmp_path / "run"), SimpleNamespace(), student)
    assert unknown["teacher_params"] is None and unknown["flops_total"] is None
    # grpo: no teacher, no scored tokens, nothing unknown
    write_steps(tmp_path / "grpo", [{"step": 1, **{k: v for k, v in step.items() if k != "teacher_scored_tokens"}}])
    assert compute.rl_block(FakeRun(tmp_path / "grpo"), SimpleNamespace(), student)["flops_total"] == 2 * n * 60 + 6 * n * 60


def stage_run(path: Path, stage: str, config: dict, metrics: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(json.dumps(config))
    write_json(path / "metrics.json", {"stage": stage, **metrics})
    return path


def test_compare_adds_up_each_model_s_lineage(tmp_path):
    """SFT on filtered traces of a teacher (made by distill train itself: its cost is not the
    student's), RL only, on-policy distillation, and the base: each model's training FLOPs."""
    n, nt = 2 * QWEN_LAYER + 32 + 32 * VOCAB, 2 * LLAMA_LAYER + 32 + 32 * VOCAB
    student = tiny("qwen")
    teacher_run = stage_run(tmp_path / "teacher-train", "train", {"data": "corpus.jsonl"},
                            {"compute": compute.block("training", student_params=nt, student_tokens_forward_backward=10**9)})
    tiny("llama").save_pretrained(teacher_run / "model")
    gen = stage_run(tmp_path / "gen", "generate", {"model": str(teacher_run / "model"), "data": "problems.jsonl"},
                    {"compute": compute.generate_block(str(teacher_run / "model"), 1_000, 9_000)})
    (gen / "traces.jsonl").write_text("")
    filtered = stage_run(tmp_path / "filter", "filter", {"traces": str(gen), "student": str(teacher_run / "model")},
                         {"compute": compute.filter_block([gen])})
    (filtered / "accepted.parquet").write_text("")
    sft = stage_run(tmp_path / "sft", "train", {"data": str(filtered / "accepted.parquet"), "student": "Qwen/base"},
                    {"compute": compute.block("training", student_params=n, student_tokens_trained=3_000, student_tokens_forward_backward=5_000)})
    grpo = stage_run(tmp_path / "grpo", "grpo", {"student": "Qwen/base", "data": "problems.jsonl"},
                     {"compute": compute.block("training", student_params=n, student_prompt_tokens=2_000, student_tokens_generated=8_000,
                                               student_tokens_trained=8_000, student_tokens_forward_backward=10_000)})
    # on-policy: its metrics.json as grpo's shared final metrics write it, from its step records
    onpolicy = tmp_path / "onpolicy"
    write_steps(onpolicy, [{"step": s, "prompt_tokens": 500, "generated_tokens": 1_500, "trained_tokens": 1_500,
                            "forward_backward_tokens": 2_000, "no_grad_tokens": 0, "teacher_scored_tokens": 2_000} for s in (1, 2)])
    ledger = compute.rl_block(FakeRun(onpolicy), SimpleNamespace(teacher=str(teacher_run / "model")), student)
    # `variant: grpo` names the sibling grpo run's directory too, as in `distill demo`: a setting, not a path
    stage_run(onpolicy, "onpolicy", {"student": "Qwen/base", "teacher": str(teacher_run / "model"), "data": "problems.jsonl", "variant": "grpo"},
              {"compute": ledger})  # fmt: skip
    for made in (sft, grpo, onpolicy):
        (made / "model").mkdir(exist_ok=True)
    evals = [make_eval_run(tmp_path / "eval-base", "Qwen/base", 0.2, seed=1), make_eval_run(tmp_path / "eval-sft", str(sft / "model"), 0.8, seed=2),
             make_eval_run(tmp_path / "eval-grpo", str(grpo / "model"), 0.4, seed=3),
             make_eval_run(tmp_path / "eval-onpolicy", str(onpolicy / "model"), 0.7, seed=4)]  # fmt: skip

    assert {k: [p.name for p in v] for k, v in lineage(evals[1]).items()} == {"train": ["sft"], "filter": ["filter"], "generate": ["gen"]}
    assert {k: [p.name for p in v] for k, v in lineage(evals[3]).items()} == {"onpolicy": ["onpolicy"]}, "the teacher's making is not followed"
    summary = run(CompareConfig(runs=tuple(evals), baseline=evals[0], out=tmp_path / "report"))
    cost = {row["label"]: row["cost"] for row in summary["rows"]}
    assert cost["eval-base"]["flops"] == 0
    assert cost["eval-sft"]["flops"] == 2 * nt * 10_000 + 6 * n * 5_000
    assert cost["eval-grpo"]["flops"] == 2 * n * 10_000 + 6 * n * 10_000
    # the teacher scored 2 x 2,000 sampled tokens and read the 2 x 500 prompt tokens ahead of them
    assert cost["eval-onpolicy"]["flops"] == 2 * nt * 5_000 + 2 * n * 4_000 + 6 * n * 4_000
    assert cost["eval-onpolicy"]["teacher_tokens_scored"] == 5_000 and cost["eval-sft"]["teacher_tokens"] == 9_000

    report = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in summary["summary_table"].splitlines() if line.startswith("| eval-sft |"))
    assert row.endswith(f"| {compute.human(2 * nt * 10_000 + 6 * n * 5_000)} |") and "accuracy_vs_compute.png" in report
    data = (tmp_path / "report" / "accuracy_vs_compute.png").read_bytes()
    assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_from_before_the_ledger_are_estimated_or_unknown(tmp_path):
    """A train run without a compute block: its trained tokens x 6N, N from its exported weights,
    marked estimated; a generate run whose teacher is nowhere on this machine: unknown."""
    old = stage_run(tmp_path / "old-sft", "train", {}, {"train_tokens": 1_000})
    tiny("qwen").save_pretrained(old / "model")
    ledger = compute.ledger_of(old)
    assert ledger["estimated"] and ledger["flops_total"] == 6 * (2 * QWEN_LAYER + 32 + 32 * VOCAB) * 1_000
    gone = stage_run(tmp_path / "old-gen", "generate", {"model": "org/served-teacher"}, {"completion_tokens": 5})
    assert compute.ledger_of(gone)["flops_total"] is None and compute.ledger_of(tmp_path / "nothing") is None


def test_a_generate_run_made_in_shards_counts_every_shard(tmp_path):
    """`distill generate --shard I/N` writes metrics.shard-I-of-N.json, no metrics.json: the
    lineage still finds the run, and its cost is every shard's."""
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "config.yaml").write_text(json.dumps({"model": "org/served", "data": "problems.jsonl"}))
    for shard, tokens in ((0, 1_000), (1, 3_000)):
        write_json(gen / f"metrics.shard-{shard}-of-2.json", {"stage": "generate", "wall_time_s": 1800.0, "completion_tokens": tokens,
                                                             "compute": compute.generate_block("org/served", 0, tokens, params=1e9)})
    filtered = stage_run(tmp_path / "filter", "filter", {"traces": str(gen)}, {"compute": compute.filter_block([gen])})
    (filtered / "accepted.parquet").write_text("")
    sft = stage_run(tmp_path / "sft", "train", {"data": str(filtered / "accepted.parquet")},
                    {"compute": compute.block("training", student_params=100, student_tokens_forward_backward=10)})
    found = lineage(sft)
    assert [p.name for p in found["generate"]] == ["gen"]
    cost = cost_of({"train": [sft], **found})
    assert cost["flops"] == 2 * 1e9 * 4_000 + 6 * 100 * 10 and cost["teacher_tokens"] == 4_000 and cost["wall_hours"] == 1.0


def test_a_step_s_token_counts_follow_what_the_update_runs():
    """rl_step counts the rollout (every sample), the sequences grpo._optimise trains (a known
    reward or a teacher's per-token advantages) once per epoch, and the no-grad passes."""
    from distill.students.grpo import Group, Sample

    def sample(prompt: int, completion: int, reward: float | None, **teacher) -> Sample:
        made = Sample([1] * prompt, [2] * completion, "", False, SimpleNamespace(total=reward))
        for key, value in teacher.items():
            setattr(made, key, value)
        return made

    one = SimpleNamespace(sum=lambda values: list(values))  # a single process
    rolled = [Group(0, "a", [sample(3, 5, 1.0), sample(3, 7, None)]), Group(1, "b", [sample(4, 2, 0.0), sample(4, 6, 1.0)])]
    grpo = SimpleNamespace(mu=1, minibatches=1, beta=0.0)
    assert compute.rl_step(rolled, rolled[:1], grpo, one) == {"prompt_tokens": 14, "generated_tokens": 20, "forward_backward_tokens": 8,
                                                              "no_grad_tokens": 0}  # fmt: skip
    reused = SimpleNamespace(mu=2, minibatches=2, beta=0.1)  # old-policy and reference log-probs
    assert compute.rl_step(rolled, rolled, reused, one)["no_grad_tokens"] == 2 * (8 + 6 + 10) and \
        compute.rl_step(rolled, rolled, reused, one)["forward_backward_tokens"] == 2 * (8 + 6 + 10)
    # onpolicy: the teacher's advantages train the sample whose reward is unknown too, and its
    # hook's pass for the sampling log-probs is a no-grad pass even with one optimizer step
    scored = [Group(0, "a", [sample(3, 5, None, token_advantages=[0.1], sampling_logprobs=[-1.0]) for _ in range(2)])]
    assert compute.rl_step(scored, scored, grpo, one) == {"prompt_tokens": 6, "generated_tokens": 10, "forward_backward_tokens": 16,
                                                          "no_grad_tokens": 16}  # fmt: skip

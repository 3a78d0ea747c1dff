"""Benchmark: `distill grpo` against TRL's GRPOTrainer, and on-policy distillation against TRL's GKD trainer, on the toy world.

    python bench/rl_vs_trl.py                              # 3-10 minutes on 2 shared cores, by their load; prints the section
    python bench/rl_vs_trl.py --repeats 2 --write docs/benchmarks.md   # the recorded figures (6-15 minutes)
    python bench/rl_vs_trl.py --quick                      # fewer steps and held-out samples
    python bench/rl_vs_trl.py --smoke --out /tmp/rl-smoke  # a minute: checks the plumbing, not the speed
    python bench/rl_vs_trl.py --report --out DIR [--write docs/benchmarks.md]   # the section again from DIR/results.json

The toy world (distill.toy): the committed base student (distill/toy/assets/base, ~0.8M
parameters) and teacher (assets/teacher, ~2.3M, the same character tokenizer), problems from
toy.train_split, the bare-problem prompt (toy.INSTRUCTION) rendered by the model's own chat
template (whose generation prompt opens `<think>`). Every run, in its own process, one after the
other (so peak memory does not mix), with the same torch thread count:

RL, the same reward on both sides: distill's verifier reward (distill.rewards.score with the
default RewardConfig: 1 for a correct boxed answer by distill.verify.Verifier, + 0.1 for the
format), wrapped as a TRL reward function (the `<think>` prefill put back, as distill grpo does).
- distill-grpo: `distill grpo` (students.grpo.run via load_grpo_config), variant grpo, engine hf
  with every rollout of a step in one batch.
- trl-grpo: trl.GRPOTrainer, loss_type="grpo" (each sequence's token mean, then the mean over
  sequences: distill's grpo aggregation), scale_rewards="group" (advantages divided by the
  group's std + 1e-4, as distill), epsilon 0.2, num_iterations 1 (mu), beta 0, generation by
  transformers' model.generate, the whole step's P x G rollouts in one micro-batch.
Both: P prompts per step, G completions per prompt (num_generations), the same max completion
length, temperature 1, top-p 1, lr constant, AdamW (0.9, 0.999, 1e-8, no weight decay), grad
clip 1, fp32, no gradient checkpointing, seed 0, one optimizer step per rollout step. The step's
problems are the same on both sides: steps x P problems, one epoch, TRL fed them in distill's order.

On-policy distillation, teacher = the toy teacher, every sample the student's own (GKD lambda = 1):
- trl-gkd: trl.experimental.gkd.GKDTrainer, lmbda=1, beta=1. In TRL 1.16's generalized_jsd_loss
  beta=1 takes `F.kl_div(teacher_log_probs, student_log_probs, log_target=True)`, i.e.
  sum_v p_s (log p_s - log p_t) = KL(student || teacher), the reverse KL, at every completion
  position over the whole vocabulary; temperature 1 (GKD samples at `temperature` but computes the
  divergence at 1.0: only 1 keeps the two consistent).
- trl-distillation: trl.DistillationTrainer (TRL's own replacement for GKD at lambda=1,
  temperature=1; GKD warns to use it), beta=1 (reverse KL), chunked loss.
- distill-onpolicy: `distill onpolicy` (distill.students.onpolicy, grpo's loop with the teacher
  scoring every sampled token through the hf engine), reward_weight 0, aggregation token (the
  batch's token mean, as GKD's per-token mean); without the module in the checkout, the row says so.
- Two settings make TRL 1.16's GKDTrainer train what it documents (the section explains them):
  the data's assistant turn opens with the template's `<think>` prefill (each row carries the
  problem's correct worked solution, unused at lambda = 1), and compute_loss gets
  num_items_in_batch=None (transformers counts it on the data set's labels, which GKD's
  on-policy sample replaces).
Both TRL distillation trainers take one completion per dataset row; their data is the same P x
steps problems, each repeated G times in a row, read in order (distill's), P x G rows per step:
each step samples the same P problems G times each, as the distill side's step does.

Figures, the same code for every run:
- seconds per step: wall time between consecutive step ends (steps 2..N: the first step carries
  the warm-up), median; split into rollout (distill: its own metrics.jsonl rollout_s, which is
  generation + grading + advantages; TRL GRPO: the time inside _generate_and_score_completions,
  the same work; GKD: inside generate_on_policy_outputs; DistillationTrainer: inside
  _generate_and_score_completions) and update (the rest of the step: loss, backward, optimizer).
- CPU seconds per step: CPU time of the process (all threads) and its live children (the
  verifier's workers) between consecutive step ends, median.
  On a machine shared with other jobs, CPU time measures the work; wall time also the neighbours.
- peak memory: the largest RSS of the worker process plus its children (the verifier's worker
  processes), sampled every 50 ms during model loading and training (psutil).
- the curve: each trained model (and the base, for the start) sampled on the held-out toy test
  split (toy.heldout_split, k samples per problem, temperature 1, fixed per-sample seeds, by
  distill's hf engine), then (a) the mean reward and accuracy by the same reward function as
  training, and (b) the per-token reverse KL to the teacher on those samples:
  sum_v p_s(v) (log p_s(v) - log p_t(v)) at every generated position, averaged over tokens
  (`held_out`). Also each run's own training-time figure per step (reward; GKD's loss).
- --repeats N runs everything N times, alternating the order, and pools the step times; with
  fixed seeds the repeats train the same models, so the held-out figures are the first's.
Torch threads: 1 per process by default (on 2 cores shared with other jobs, 2 threads per
process wait on each other; see the section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.sft_vs_trl (replace_section) and this checkout's distill

SECTION = "## RL and on-policy distillation vs TRL (`bench/rl_vs_trl.py`, CPU)"
CONFIGS = ["distill-grpo", "trl-grpo", "distill-onpolicy", "trl-gkd", "trl-distillation"]
LABELS = {
    "distill-grpo": "`distill grpo` (variant grpo, hf engine)",
    "trl-grpo": "TRL GRPOTrainer (loss_type grpo)",
    "distill-onpolicy": "`distill onpolicy` (reverse KL)",
    "trl-gkd": "TRL GKDTrainer (lmbda 1, beta 1)",
    "trl-distillation": "TRL DistillationTrainer (beta 1)",
}
PAIRS = [("distill-grpo", "trl-grpo"), ("distill-onpolicy", "trl-gkd"), ("distill-onpolicy", "trl-distillation")]
SIZES = {
    # steps, prompts per step, completions per prompt, max new tokens (None: toy.MAX_NEW_TOKENS),
    # held-out problems per level (5 levels), samples per held-out problem
    "full": dict(steps=10, prompts=4, group=8, max_tokens=None, per_level=6, k=2),
    "quick": dict(steps=6, prompts=4, group=8, max_tokens=None, per_level=4, k=2),
    "smoke": dict(steps=2, prompts=2, group=2, max_tokens=24, per_level=1, k=1),
}
TRAIN_SEED = 7  # the toy.train_split seed of the bench's problems (the test split is excluded by toy)


# --------------------------------------------------------------------------------------------
# data


def prepare(workdir: Path, settings: dict) -> dict:
    """The training problems (steps x P, one epoch) and the held-out problems, as JSONL."""
    from distill import toy

    problems = toy.train_split(settings["steps"] * settings["prompts"], seed=TRAIN_SEED, name="bench")
    toy.write_problems(problems, workdir / "train.jsonl")
    held_out = toy.heldout_split(settings["per_level"])
    toy.write_problems(held_out, workdir / "held_out.jsonl")
    return {"train_problems": len(problems), "held_out_problems": len(held_out)}


def read_problems(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def distill_order(count: int, seed: int) -> list[int]:
    """The order in which `distill grpo` takes a file's problems in its first epoch (a seeded
    permutation; see problem_at in distill/students/grpo.py). TRL is fed the same order, so both
    sides train on the same problems at each step; were this to drift from grpo's own, only the
    order would differ, never the set (one epoch of the same file)."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()


# --------------------------------------------------------------------------------------------
# measurement inside a worker


class PeakRSS:
    """The largest RSS of this process plus all its descendants, sampled on a thread."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for process in [self._process, *self._process.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:  # a child that just ended
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(interval_s)

    def stop(self) -> float:
        """Peak in GiB."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live children (the verifier's workers)."""
    import psutil

    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a child that just ended
            pass
    return total


class StepClock:
    """Wall and CPU time at each step end, and the rollout seconds inside each step."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []  # (perf_counter, cpu_seconds()) at each step end
        self.rollout: list[float] = []  # seconds of rollout inside each step (TRL sides)
        self._pending = 0.0

    def add_rollout(self, seconds: float) -> None:
        self._pending += seconds

    def step_end(self) -> None:
        self.ends.append((time.perf_counter(), cpu_seconds()))
        self.rollout.append(self._pending)
        self._pending = 0.0

    def steps(self, train_values: list, rollout_s: list | None = None) -> list[dict]:
        """One record per step; step 1 has no interval (no step end before it)."""
        rollout_s = rollout_s if rollout_s is not None else self.rollout
        records = []
        for i, (wall, cpu) in enumerate(self.ends):
            record = {"step": i + 1, "rollout_s": rollout_s[i] if i < len(rollout_s) else None, "train": train_values[i] if i < len(train_values) else None}
            if i:
                record["wall_s"] = wall - self.ends[i - 1][0]
                record["cpu_s"] = cpu - self.ends[i - 1][1]
                if record["rollout_s"] is not None:
                    record["update_s"] = record["wall_s"] - record["rollout_s"]
            records.append(record)
        return records


def trl_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    return Clock()


def reward_function(max_tokens: int):
    """distill's verifier reward as a TRL reward function (conversational prompts: each
    completion is [{"role": "assistant", "content": text}]); the `<think>` prefill of the chat
    template is put back before grading, as distill grpo does (teacher.prompts.full_completion)."""
    from transformers import AutoTokenizer

    from distill import toy
    from distill.rewards import RewardConfig, score
    from distill.teacher.prompts import full_completion, render_prompt
    from distill.verify import Verifier

    tokenizer = AutoTokenizer.from_pretrained(toy.BASE_DIR)
    verifier = Verifier(workers=1, timeout_s=5.0, no_answer_fallback="none")  # distill grpo's settings for the toy demo
    rendered: dict[str, object] = {}

    def distill_reward(prompts, completions, completion_ids, answer, problem, **kwargs):
        texts = []
        for text, question in zip(completions, problem):
            if question not in rendered:
                rendered[question] = render_prompt(tokenizer, question, instruction=toy.INSTRUCTION)
            texts.append(full_completion(rendered[question], text[0]["content"]))
        rewards = score(verifier, list(answer), texts, [len(ids) for ids in completion_ids], RewardConfig(), max_tokens=max_tokens, overlong_penalty=False)
        return [r.total for r in rewards]

    distill_reward.verifier = verifier
    return distill_reward


# --------------------------------------------------------------------------------------------
# workers (one process each)


def distill_run(workdir: Path, name: str, s: dict, clock: StepClock, load, run, extra: list[str], figure: tuple[str, str]) -> dict:
    """A distill RL-loop stage (grpo, onpolicy) with the bench's settings; the step ends are
    taken where the loop logs each step's record (RunDir.log_metrics, once per step)."""
    from distill import toy
    from distill.rundir import RunDir

    out = workdir / name
    logged = RunDir.log_metrics

    def log_metrics(self, record):
        clock.step_end()
        return logged(self, record)

    RunDir.log_metrics = log_metrics
    batch = s["prompts"] * s["group"]
    overrides = [
        f"student={toy.BASE_DIR}", f"data={workdir / 'train.jsonl'}", f"out={out}", f"steps={s['steps']}",
        f"prompts_per_step={s['prompts']}", f"group_size={s['group']}", f"max_tokens={s['max_tokens']}", "temperature=1.0",
        f"lr={s['lr']}", "schedule=constant", "warmup_steps=0", "beta=0.0", "instruction=", "chat_template=model",
        f"micro_batch_size={batch}", "seed=0", "save_every=100000", "verifier_workers=1", "engine=hf",
        f"engine_options={{batch_size: {batch}, device: cpu}}", *extra,
    ]  # fmt: skip
    loaded = load(overrides=overrides)
    run(loaded.config, loaded.sources)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "rollout_s" in r]
    steps = clock.steps([r.get(figure[0]) for r in records], [r["rollout_s"] for r in records])
    return {"steps": steps, "model_dir": str(out / "model"), "train_figure": figure[1], "metrics": records}


def worker_distill_grpo(workdir: Path, s: dict, clock: StepClock) -> dict:
    from distill.students.grpo import load_grpo_config, run

    return distill_run(workdir, "distill-grpo", s, clock, load_grpo_config, run, ["variant=grpo"], ("reward_mean", "reward"))


def trl_common(workdir: Path, name: str, s: dict) -> dict:
    """TrainingArguments shared by every TRL run: the distill side's optimisation settings."""
    return dict(
        output_dir=str(workdir / name), max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, gradient_accumulation_steps=1,
        gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, disable_dropout=True,
    )  # fmt: skip


def worker_trl_grpo(workdir: Path, s: dict, clock: StepClock) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from distill import toy

    problems = read_problems(workdir / "train.jsonl")
    ordered = [problems[i] for i in distill_order(len(problems), seed=0)]
    rows = [{"prompt": toy.prompt_messages(p["problem"]), "answer": p["answer"], "problem": p["problem"]} for p in ordered]
    args = GRPOConfig(
        **trl_common(workdir, "trl-grpo", s), per_device_train_batch_size=s["prompts"] * s["group"], num_generations=s["group"],
        max_completion_length=s["max_tokens"], temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="grpo",
        scale_rewards="group", epsilon=0.2, num_iterations=1, shuffle_dataset=False,
    )  # fmt: skip

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                clock.add_rollout(time.perf_counter() - started)

    reward = reward_function(s["max_tokens"])
    tokenizer = AutoTokenizer.from_pretrained(toy.BASE_DIR)
    model = AutoModelForCausalLM.from_pretrained(toy.BASE_DIR)
    trainer = Timed(model=model, reward_funcs=[reward], args=args, train_dataset=datasets.Dataset.from_list(rows),
                    processing_class=tokenizer, callbacks=[trl_callback(clock)])  # fmt: skip
    try:
        trainer.train()
    finally:
        reward.verifier.close()
    trainer.save_model(str(workdir / "trl-grpo" / "model"))
    logged = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return {"steps": clock.steps(logged), "model_dir": str(workdir / "trl-grpo" / "model"), "train_figure": "reward"}


def distillation_rows(workdir: Path, s: dict, conversations: bool) -> list[dict]:
    """The P x steps problems, each G times in a row, in distill's order: read in order (no
    shuffling), each step's P x G rows are the P problems distill's step rolls out G times each.

    GKD's collator (DataCollatorForChatML) wants whole conversations and finds the prompt as the
    prefix of the rendered conversation that has the generation prompt's length. With lmbda = 1
    the assistant turn is never trained on (the student's sample replaces it), but it must start
    with the template's prefill (`<think>`): with an empty turn the prefix is wrong and the
    student is prompted with a closed assistant turn. So each row carries the problem's correct
    worked solution (toy.write_trace without slips), as a real GKD data set would."""
    import random

    from distill import toy

    by_text = {p.problem: p for p in toy.train_split(s["steps"] * s["prompts"], seed=TRAIN_SEED, name="bench")}
    problems = read_problems(workdir / "train.jsonl")
    rows = []
    for p in [problems[i] for i in distill_order(len(problems), seed=0)]:  # distill's order: each step the same P problems
        prompt = toy.prompt_messages(p["problem"])
        if conversations:
            solution, _ = toy.write_trace(by_text[p["problem"]], random.Random(0))
            row = {"messages": [*prompt, {"role": "assistant", "content": solution}]}
        else:
            row = {"prompt": prompt}
        rows += [row] * s["group"]
    return rows


def worker_trl_gkd(workdir: Path, s: dict, clock: StepClock) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill import toy

    args = GKDConfig(
        **trl_common(workdir, "trl-gkd", s), per_device_train_batch_size=s["prompts"] * s["group"], lmbda=1.0, beta=1.0,
        temperature=1.0, max_new_tokens=s["max_tokens"], max_length=512, seq_kd=False, train_sampling_strategy="sequential",
    )  # fmt: skip

    class Timed(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # transformers counts num_items_in_batch on the data set's labels, before GKD's
            # on-policy generation replaces them, and GKD 1.16 divides the loss by that count
            # (DistillationTrainer recounts on the generated tokens); None gives GKD's own
            # per-token mean over the generated tokens ("batchmean"), the documented loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            started = time.perf_counter()
            try:
                return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            finally:
                clock.add_rollout(time.perf_counter() - started)

    tokenizer = AutoTokenizer.from_pretrained(toy.BASE_DIR)
    model = AutoModelForCausalLM.from_pretrained(toy.BASE_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(toy.TEACHER_DIR)
    trainer = Timed(model=model, teacher_model=teacher, args=args, train_dataset=datasets.Dataset.from_list(distillation_rows(workdir, s, True)),
                    processing_class=tokenizer, callbacks=[trl_callback(clock)])  # fmt: skip
    trainer.train()
    trainer.save_model(str(workdir / "trl-gkd" / "model"))
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]
    return {"steps": clock.steps(logged), "model_dir": str(workdir / "trl-gkd" / "model"), "train_figure": "loss (reverse KL per token)"}


def worker_trl_distillation(workdir: Path, s: dict, clock: StepClock) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from distill import toy

    args = DistillationConfig(
        **trl_common(workdir, "trl-distillation", s), per_device_train_batch_size=s["prompts"] * s["group"], beta=1.0,
        temperature=1.0, top_p=1.0, top_k=0, max_completion_length=s["max_tokens"], shuffle_dataset=False,
    )  # fmt: skip

    class Timed(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                clock.add_rollout(time.perf_counter() - started)

    tokenizer = AutoTokenizer.from_pretrained(toy.BASE_DIR, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(toy.BASE_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(toy.TEACHER_DIR)
    trainer = Timed(model=model, teacher_model=teacher, args=args, train_dataset=datasets.Dataset.from_list(distillation_rows(workdir, s, False)),
                    processing_class=tokenizer, callbacks=[trl_callback(clock)])  # fmt: skip
    trainer.train()
    trainer.save_model(str(workdir / "trl-distillation" / "model"))
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e and "train_loss" not in e]
    return {"steps": clock.steps(logged), "model_dir": str(workdir / "trl-distillation" / "model"), "train_figure": "loss (reverse KL per token)"}


def onpolicy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("distill.students.onpolicy") is not None


def worker_distill_onpolicy(workdir: Path, s: dict, clock: StepClock) -> dict:
    from distill import toy
    from distill.students.onpolicy import load_onpolicy_config, run

    # the student's samples only (reward_weight 0), every token's advantage its reverse-KL
    # estimate against the teacher, averaged over the batch's tokens (aggregation token, as GKD)
    extra = [f"teacher={toy.TEACHER_DIR}", "teacher_engine=hf", "reward_weight=0.0", "aggregation=token"]
    return distill_run(workdir, "distill-onpolicy", s, clock, load_onpolicy_config, run, extra, ("reverse_kl", "reverse KL per token (sampled tokens)"))


WORKERS = {
    "distill-grpo": worker_distill_grpo,
    "trl-grpo": worker_trl_grpo,
    "distill-onpolicy": worker_distill_onpolicy,
    "trl-gkd": worker_trl_gkd,
    "trl-distillation": worker_trl_distillation,
}


def run_worker(name: str, workdir: Path, settings: dict, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    memory = PeakRSS()
    clock = StepClock()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = WORKERS[name](workdir, settings, clock)
    result["cpu_s"] = cpu_seconds() - cpu_started  # the children still running (none, once the verifier is closed) count
    result["peak_rss_gb"] = memory.stop()
    result["wall_s"] = time.perf_counter() - started
    result["threads"] = torch.get_num_threads()
    (workdir / f"{name}.json").write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------
# the held-out figures: one function for every model


def held_out(model_dir: str | Path, workdir: Path, settings: dict) -> dict:
    """Sample `k` completions of each held-out problem from the model at `model_dir` (distill's
    hf engine, temperature 1, fixed per-sample seeds), then: the mean reward and accuracy under
    the training reward, and the per-token reverse KL to the toy teacher on those samples,
    KL(p_student || p_teacher) summed over the vocabulary at every generated position, averaged
    over all generated tokens (the end-of-turn token included)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill import toy
    from distill.engines import Request, Sampling, make_engine
    from distill.rewards import RewardConfig, score
    from distill.teacher.prompts import full_completion, render_prompt
    from distill.verify import Verifier

    tokenizer = AutoTokenizer.from_pretrained(toy.BASE_DIR)  # shared by the base, the teacher and every trained model
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(toy.TEACHER_DIR).eval()
    problems = read_problems(workdir / "held_out.jsonl")
    rendered = {p["id"]: render_prompt(tokenizer, p["problem"], instruction=toy.INSTRUCTION) for p in problems}
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=settings["max_tokens"])
    requests = [Request(f"{p['id']}/{j}", rendered[p["id"]].text, sampling, 1000 * i + j) for i, p in enumerate(problems) for j in range(settings["k"])]
    engine = make_engine("hf", str(model_dir), tokenizer=tokenizer, hf_model=student, batch_size=64, device="cpu")
    with torch.no_grad():
        completions = {c.key: c for c in engine.generate(requests)}
    engine.close()
    ordered = [completions[r.key] for r in requests]
    answers = {p["id"]: p["answer"] for p in problems}
    ids = [r.key.split("/")[0] for r in requests]
    texts = [full_completion(rendered[i], c.text) for i, c in zip(ids, ordered)]
    verifier = Verifier(workers=1, timeout_s=5.0, no_answer_fallback="none")
    try:
        rewards = score(verifier, [answers[i] for i in ids], texts, [len(c.token_ids) for c in ordered], RewardConfig(),
                        max_tokens=settings["max_tokens"], overlong_penalty=False)  # fmt: skip
    finally:
        verifier.close()

    sample_kl, sample_tokens = [], []  # per sample: summed KL over its tokens, its token count
    prompt_ids = {i: tokenizer(rendered[i].text, add_special_tokens=False)["input_ids"] for i in rendered}
    rows = [(prompt_ids[i], list(c.token_ids)) for i, c in zip(ids, ordered) if c.token_ids]
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = rows[start : start + 32]
            length = max(len(p) + len(c) for p, c in batch)
            input_ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), length), dtype=torch.long)
            positions = torch.zeros((len(batch), length), dtype=torch.bool)  # positions that predict a generated token
            for row, (prompt, completion) in enumerate(batch):
                input_ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
                attention[row, : len(prompt) + len(completion)] = 1
                positions[row, len(prompt) - 1 : len(prompt) + len(completion) - 1] = True
            student_logp = F.log_softmax(student(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)[positions]  # (n, V)
            teacher_logp = F.log_softmax(teacher(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)[positions]  # (n, V)
            kl = torch.zeros(positions.shape)
            kl[positions] = (student_logp.exp() * (student_logp - teacher_logp)).sum(dim=-1)
            sample_kl += kl.sum(dim=1).tolist()
            sample_tokens += positions.sum(dim=1).tolist()
    known = [r.total for r in rewards if r.total is not None]
    reward = statistics.mean(known)
    tokens = sum(sample_tokens)
    reverse_kl = sum(sample_kl) / max(tokens, 1)
    # standard errors over samples (the k samples of a problem are not independent: read them as
    # a lower bound); the KL's is the ratio estimator's (a token-weighted mean)
    m = len(sample_kl)
    kl_se = (sum((k - reverse_kl * n) ** 2 for k, n in zip(sample_kl, sample_tokens)) / (m * (m - 1))) ** 0.5 / (tokens / m) if m > 1 else None
    return {
        "reward": reward,
        "reward_se": statistics.stdev(known) / len(known) ** 0.5 if len(known) > 1 else None,
        "accuracy": sum(bool(r.correct) for r in rewards if r.total is not None) / len(known),
        "reverse_kl": reverse_kl,
        "reverse_kl_se": kl_se,
        "samples": len(requests),
        "mean_length": tokens / max(m, 1),
    }


# --------------------------------------------------------------------------------------------


def resolve_settings(args) -> dict:
    from distill import toy

    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = dict(SIZES[size], size=size, lr=args.lr, threads=args.threads)
    for key in ("steps", "prompts", "group", "k"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.max_tokens is not None:
        settings["max_tokens"] = args.max_tokens
    settings["max_tokens"] = settings["max_tokens"] or toy.MAX_NEW_TOKENS
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Sizes: " + "; ".join(f"{k}: {v}" for k, v in SIZES.items()))
    parser.add_argument("--steps", type=int, help="rollout / optimizer steps of every run (default: the size's)")
    parser.add_argument("--quick", action="store_true", help="the quick size (fewer steps and held-out samples)")
    parser.add_argument("--smoke", action="store_true", help="the smallest size: checks the plumbing in seconds (figures mean nothing)")
    parser.add_argument("--prompts", type=int, help="prompts per step")
    parser.add_argument("--group", type=int, help="completions per prompt (TRL: num_generations)")
    parser.add_argument("--max-tokens", type=int, help="max new tokens per completion (default: toy.MAX_NEW_TOKENS)")
    parser.add_argument("--k", type=int, help="samples per held-out problem")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of every run (the toy demo's GRPO lr)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker (1: on cores shared with other jobs, more threads wait on each other)")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, help="run only these (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="run every configuration this many times, alternating the order; step times pool over them")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-rl-vs-trl", help="work directory; results.json and section.md go here")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section in a Markdown file (e.g. docs/benchmarks.md)")
    parser.add_argument("--report", action="store_true", help="only render the section again from OUT/results.json (no run)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, least in (("steps", 2), ("prompts", 1), ("group", 2), ("max_tokens", 1), ("k", 1), ("threads", 1), ("repeats", 1)):
        value = getattr(args, key)
        if value is not None and value < least:  # steps: the per-step figures are taken from step 2 on; group: GRPO compares within a group
            parser.error(f"--{key.replace('_', '-')} must be at least {least}, got {value}")
    settings = resolve_settings(args)

    if args.worker:
        run_worker(args.worker, args.out, settings, args.threads)
        return

    if args.report:
        if not (args.out / "results.json").is_file():
            parser.error(f"--report: {args.out / 'results.json'} does not exist; run the benchmark with --out {args.out} first")
        summary = json.loads((args.out / "results.json").read_text())
        finish(summary, args)
        return

    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    started = time.perf_counter()
    data = prepare(args.out, settings)
    load_before = os.getloadavg()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS=str(args.threads))
    results: dict[str, dict] = {}
    names = [n for n in CONFIGS if n in (args.only or CONFIGS)]
    if "distill-onpolicy" in names and not onpolicy_available():
        results["distill-onpolicy"] = {"error": "not in this checkout (distill.students.onpolicy is missing)"}
        names.remove("distill-onpolicy")
    # Repeats re-measure the time, in the reverse order every other time (a neighbour's burst
    # then lands on other runs); with fixed seeds they train the same models, so the held-out
    # figures are taken once, on the first repeat's models.
    for repeat in range(args.repeats):
        workdir = args.out if repeat == 0 else args.out / f"repeat-{repeat}"
        if repeat:
            workdir.mkdir()
            for data_file in ("train.jsonl", "held_out.jsonl"):
                (workdir / data_file).write_bytes((args.out / data_file).read_bytes())
        for name in names if repeat % 2 == 0 else names[::-1]:
            if "error" in results.get(name, {}):
                continue
            print(f"running {name}{f' (repeat {repeat + 1})' if repeat else ''} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--worker", name, "--out", str(workdir), "--threads", str(args.threads), *passthrough(args)]
            done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
                results[name] = {"error": f"exit {done.returncode}: {last[0][:300]}"}
                (workdir / f"{name}.stderr.txt").write_text(done.stderr)
                print(f"  {name} failed: {results[name]['error']}", file=sys.stderr)
                continue
            result = json.loads((workdir / f"{name}.json").read_text())
            if repeat == 0:
                results[name] = result
            else:
                results[name].setdefault("repeats", []).append(result)
    print("held-out figures ...", file=sys.stderr, flush=True)
    import torch

    torch.set_num_threads(args.threads)
    from distill import toy

    base = held_out(toy.BASE_DIR, args.out, settings)
    for name, result in results.items():
        if "model_dir" in result:
            result["held_out"] = held_out(result["model_dir"], args.out, settings)
    load_after = os.getloadavg()
    summary = {"settings": settings, "data": data, "base": base, "runs": results, "load_average": [load_before[0], load_after[0]],
               "date": time.strftime("%Y-%m-%d"), "versions": versions(), "command": command_line(args, settings), "repeats": args.repeats}  # fmt: skip
    summary["wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    finish(summary, args)


def finish(summary: dict, args) -> None:
    section = report(summary)
    (args.out / "section.md").write_text(section)
    print(section)
    if args.write:
        from bench.sft_vs_trl import replace_section

        replace_section(args.write, section)


def passthrough(args) -> list[str]:
    """The size flags, for a worker to resolve the same settings."""
    flags = ["--lr", str(args.lr)]
    flags += ["--quick"] if args.quick else []
    flags += ["--smoke"] if args.smoke else []
    for key in ("steps", "prompts", "group", "max_tokens", "k"):
        value = getattr(args, key)
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def command_line(args, settings: dict) -> str:
    parts = ["python bench/rl_vs_trl.py", *passthrough(args), "--threads", str(args.threads)]
    parts += ["--repeats", str(args.repeats)] if args.repeats > 1 else []
    if args.only:
        parts += ["--only", *args.only]
    return " ".join(parts)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "trl", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


# --------------------------------------------------------------------------------------------
# the section


def step_figures(result: dict) -> dict:
    """Medians over steps 2..N of a run's step records, pooled over its repeats."""
    steps = [r for run in [result, *result.get("repeats", [])] for r in run["steps"] if "wall_s" in r]

    def median(key):
        values = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(values) if values else None

    train = [r["train"] for r in result["steps"] if r.get("train") is not None]
    return {"wall": median("wall_s"), "cpu": median("cpu_s"), "rollout": median("rollout_s"), "update": median("update_s"),
            "train_first": train[0] if train else None, "train_last": statistics.mean(train[-3:]) if train else None}  # fmt: skip


def peak_rss(result: dict) -> float:
    return max(run["peak_rss_gb"] for run in [result, *result.get("repeats", [])])


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(figures: dict, key: str) -> str:
    se = figures.get(f"{key}_se")
    return f"{figures[key]:.3f}" + (f" +- {se:.3f}" if se is not None else "")


def reading(runs: dict) -> list[str]:
    """The result against the target, pair by pair, from the figures (no judgement added by hand):
    per step, the wall-clock and CPU ratios; the curve, the held-out figure of the pair's
    objective (reward for RL, reverse KL for distillation), the same when within 2 standard errors."""
    lines = []
    for ours, theirs in PAIRS:
        a, b = runs.get(ours, {}), runs.get(theirs, {})
        if "steps" not in a or "steps" not in b:
            continue
        fa, fb = step_figures(a), step_figures(b)
        wall, cpu = fa["wall"] / fb["wall"], fa["cpu"] / fb["cpu"]
        speed = "faster" if wall < 1 and cpu < 1 else "slower" if wall > 1 and cpu > 1 else "mixed (wall and CPU disagree)"
        key, better = ("reward", 1) if ours == "distill-grpo" else ("reverse_kl", -1)
        x, y = a["held_out"], b["held_out"]
        margin = 2 * ((x.get(f"{key}_se") or 0) ** 2 + (y.get(f"{key}_se") or 0) ** 2) ** 0.5
        difference = x[key] - y[key]
        curve = "the same (within 2 SE)" if abs(difference) <= margin else "better" if difference * better > 0 else "worse"
        met = "met" if speed == "faster" and curve != "worse" else "not met"
        lines.append(
            f"- {LABELS[ours]} vs {LABELS[theirs]}: per step {speed} ({wall:.2f}x the wall time, {cpu:.2f}x the CPU time); "
            f"held-out {'reward' if key == 'reward' else 'reverse KL'} {x[key]:.3f} vs {y[key]:.3f}: {curve}. Target {met}."
        )
    return lines


def report(summary: dict) -> str:
    s, runs, base = summary["settings"], summary["runs"], summary["base"]
    v = summary["versions"]
    count = int(summary.get("repeats", 1))
    repeats = f"; {count} times, alternating the order (per-step figures pool all {count}; held-out figures: the first)" if count > 1 else ""
    lines = [
        SECTION,
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{summary['load_average'][0]:.1f} before, {summary['load_average'][1]:.1f} after), {s['threads']} torch thread{'s' if s['threads'] != 1 else ''} in every run, no GPU; "
        f"{summary['date']}; torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, accelerate {v['accelerate']}.  ",
        f"Size: {s['steps']} steps x {s['prompts']} prompts x {s['group']} completions, max {s['max_tokens']} new tokens, lr {s['lr']:g} "
        f"(constant), temperature 1; {summary['data']['train_problems']} toy training problems (one epoch); held-out: "
        f"{summary['data']['held_out_problems']} problems of the toy test split x {s['k']} samples. Base student and teacher: "
        f"distill/toy/assets. Each run in its own process, one after the other{repeats}.",
        "",
        "| run | s/step | rollout s/step | update s/step | CPU-s/step | peak RSS (GiB) | train figure: step 1 -> last 3 | held-out reward | held-out accuracy | reverse KL to teacher (nats/token) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base student (start) | | | | | | | {_pm(base, 'reward')} | {base['accuracy']:.3f} | {_pm(base, 'reverse_kl')} |",
    ]
    for name in CONFIGS:
        if name not in runs:
            continue
        r = runs[name]
        if "error" in r:
            lines.append(f"| {LABELS[name]} | did not run: {r['error']} | | | | | | | | |")
            continue
        f, h = step_figures(r), r["held_out"]
        lines.append(
            f"| {LABELS[name]} | {_fmt(f['wall'])} | {_fmt(f['rollout'])} | {_fmt(f['update'])} | {_fmt(f['cpu'])} | {peak_rss(r):.2f} | "
            f"{r['train_figure']}: {_fmt(f['train_first'], 3)} -> {_fmt(f['train_last'], 3)} | {_pm(h, 'reward')} | {h['accuracy']:.3f} | {_pm(h, 'reverse_kl')} |"
        )
    ratios = []
    for ours, theirs in PAIRS:
        if "steps" in runs.get(ours, {}) and "steps" in runs.get(theirs, {}):
            a, b = step_figures(runs[ours]), step_figures(runs[theirs])

            def ratio(x, y):
                return f"{x / y:.2f}x" if x is not None and y else "-"

            ratios.append(
                f"| {LABELS[ours]} / {LABELS[theirs]} | {ratio(a['wall'], b['wall'])} | {ratio(a['rollout'], b['rollout'])} | "
                f"{ratio(a['update'], b['update'])} | {ratio(a['cpu'], b['cpu'])} | {ratio(peak_rss(runs[ours]), peak_rss(runs[theirs]))} |"
            )
    if ratios:
        lines += ["", "Ratios distill / TRL (below 1: distill is faster or smaller):", "",
                  "| pair | s/step | rollout | update | CPU-s/step | peak RSS |", "|---|---|---|---|---|---|", *ratios]  # fmt: skip
        lines += ["", "Against the target (faster per step, the same or a better curve):", "", *reading(runs)]
    minutes = f" The whole benchmark took {summary['wall_s'] / 60:.1f} minutes." if summary.get("wall_s") else ""
    lines += [
        "",
        "How it was measured. Per-step figures are medians over steps 2..N (the first carries the warm-up), between consecutive",
        "step ends; CPU-s is the CPU time of the process (all threads) and of its children over the same interval, the fair",
        "measure on shared cores (wall time also measures the neighbours). Rollout: distill's own rollout_s (generate, grade,",
        "advantages); TRL GRPO: the time inside `_generate_and_score_completions` (the same work); GKD: inside",
        "`generate_on_policy_outputs`; DistillationTrainer: inside `_generate_and_score_completions`. Update = step - rollout, so",
        "the teacher's forward is in the update on every side (distill onpolicy's teacher scoring and its student log-prob pass",
        "run between its rollout and its update). Peak RSS: the worker process and its children (the verifier's processes),",
        "sampled every 50 ms. Held-out figures: one function (`held_out`) for every model, on fresh samples of each model;",
        "+- is one standard error over the samples (the k samples of a problem are correlated: read it as a lower bound)." + minutes,
        "",
        "What differs between the sides, and why:",
        "- RL: TRL's `loss_type=\"grpo\"` is distill's grpo aggregation (each sequence's token mean, then the mean over",
        "  sequences), `scale_rewards=\"group\"` its advantage (std with Bessel's correction, + 1e-4); the reward is distill's own",
        "  function in both. TRL generates with `model.generate` over the whole padded batch until its longest sample ends;",
        "  distill's hf engine drops each row as it ends.",
        "- Distillation: TRL's GKD and DistillationTrainer with beta = 1 minimise the reverse KL computed over the whole",
        "  vocabulary at every position of the student's samples (TRL 1.16's `generalized_jsd_loss`: beta = 1 is",
        "  `F.kl_div(teacher_log_probs, student_log_probs, log_target=True)` = KL(student || teacher)); `distill onpolicy` uses",
        "  the sampled-token estimate log p_student(x_t) - log p_teacher(x_t) as a per-token advantage in grpo's surrogate",
        "  (tinker-cookbook's on-policy distillation). Two estimators of one objective: the held-out column measures the exact",
        "  per-token reverse KL for all of them.",
        "- TRL 1.16 GKDTrainer, two settings this bench makes so that it trains what it documents: its collator",
        "  (DataCollatorForChatML) finds the prompt as a prefix of the rendered conversation, so the data's assistant turn must",
        "  open with the template's `<think>` prefill (an empty turn prompts the student with a closed assistant turn): each",
        "  row carries the problem's correct worked solution, never trained on at lambda = 1; and transformers counts",
        "  `num_items_in_batch` on those data-set labels before GKD replaces them by the student's sample, which GKD then",
        "  divides its loss by (DistillationTrainer recounts on the generated tokens): the bench passes None, GKD's own",
        "  per-token mean. TRL 1.16 runs with transformers 5.19 on CPU for all three trainers (warnings only).",
        "- Torch threads: 1 by default. On 2 cores shared with other jobs, 2 threads per process wait on each other: a trial",
        "  with 2 threads under load average ~14 took 88 s for a `distill grpo` rollout that took 3 s with 1 thread.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

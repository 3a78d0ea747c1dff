"""distill grpo: the RL-only baseline (GRPO, Dr. GRPO, DAPO) from the same base, rewarded by the shared verifier.

    distill grpo --student qwen-1.5b --data gsm8k-train --out runs/grpo-1.5b [--recipe R.yaml] [key=value ...]
    torchrun --nproc_per_node 8 -m distill.cli grpo --recipe recipes/grpo/dapo-qwen-7b.yaml --out runs/dapo-7b

The DeepSeek-R1 paper's central comparison is distillation against RL from the same base (on
Qwen-32B-Base: 72.6 on AIME24 distilled, 47.0 with RL alone). This stage is the RL side, one
explicit loop:

    for step in range(steps):
        rollout   P prompts x G completions through the shared engine layer (hf | vllm colocated)
        reward    the shared verifier (accuracy) + format [+ DAPO's overlong penalty] [+ loop penalty]
        advantage group-relative: (r - mean) [/ std] over each prompt's G completions
        update    mu epochs over the rollout batch, each split into `minibatches` optimizer steps
                  of accumulated micro-batches: clipped-ratio surrogate [+ beta * k3 KL]
        log       metrics.jsonl (one line per step), progress bar; checkpoint every save_every
    export        RUN_DIR/model: a Hugging Face directory (chat template included) for distill eval

Variants (`variant=`; each of their knobs can also be set on its own; see distill.students.rl):
    grpo     DeepSeekMath, as used for R1-Zero: std-normalised advantages, each sequence's token
             mean then the mean over sequences, eps 0.2
    dr_grpo  Dr. GRPO: no std normalisation, token sum divided by a constant (N * max_tokens)
    dapo     DAPO: clip-higher (eps_low 0.2, eps_high 0.28), token mean over the whole batch,
             dynamic sampling (groups whose rewards are all equal are dropped and more prompts
             are rolled out, at most `max_refills` times per step; the batch is then cut to
             prompts_per_step groups), soft overlong punishment (`overlong=mask` for overlong
             filtering instead)

Choices, and how this differs from the papers:
- Defaults are DeepSeek-R1-Zero's where the paper gives them: G = 16, 32 prompts per step,
  temperature 1.0, lr 3e-6, rule-based accuracy + format rewards. The format weight (0.1) is
  ours (the paper gives none). beta is 0 by default (DAPO and Dr. GRPO drop the KL term; R1-Zero
  used 0.001, DeepSeekMath 0.04); with beta > 0 the reference is the initial policy, frozen
  (R1 replaced it with the policy every 400 steps; we do not), or the base under LoRA.
- R1-Zero split each rollout of 8192 completions into 16 mini-batches for one epoch. Here one
  step rolls out prompts_per_step x G completions; `minibatches` and `mu` say how many optimizer
  steps they feed. The default (1, 1) is strictly on-policy: the ratio is exactly 1 and nothing
  is clipped; raise them to reuse rollouts (e.g. minibatches=16 for R1-Zero's 16 updates).
- The learning-rate schedule advances once per rollout step (constant by default, as
  DeepSeekMath and DAPO), whatever the number of optimizer steps inside it.
- Log-probs for the ratio are recomputed by the trainer, never taken from the engine, at the
  sampling temperature (logits / T) and without materialising the logits (distill train's
  chunked Scorer). The old policy's come from a no-grad pass before a step's first update,
  skipped when the step has one update (then old = current, detached: ratio 1).
- Dropout is off (probabilities set to 0; the model stays in training mode so activation
  checkpointing stays on): the ratio compares one function under two sets of weights, not two
  dropout masks.
- top_p < 1 is allowed but makes the trainer's log-probs (full distribution) differ from the
  sampler's (nucleus); RL recipes keep top_p = 1.
- Unknown rewards (no or unparseable reference, verifier timeout) are never rewarded 0: the
  completion leaves its group's statistics and the loss, and is counted (`unverifiable`,
  `timeouts`); a group with fewer than two known rewards trains nothing.
- grpo and dr_grpo keep groups whose rewards are all equal (advantage 0, but their tokens count
  in the normaliser, as in the papers); dapo drops them.
- Gradient accumulation and data parallelism are exact: each optimizer step's normaliser
  (sequences, tokens) is taken over its whole mini-batch on all ranks before any micro-batch
  runs, so 1 or 8 processes and any micro_batch_size give the same gradient.
- Optimizer, precision, LoRA/QLoRA, activation checkpointing, FSDP2 sharding, checkpoints and
  the HF export are distill train's (students/sft.py, parallel.py, checkpoint.py): one copy.
  A student preset brings its model, chat template and memory plan, not SFT's learning rate.
- Rollouts: `engine=hf` samples from the policy object itself (under FSDP its parameters are
  gathered once for the whole rollout); `engine=vllm` runs vLLM in the same process
  (colocated; on GPUs gpu_memory_utilization 0.3 by default) and loads the new weights after
  every update (LoRA merged for the copy); its rollouts stop at the chat template's end of
  turn, as the hf engine's do. Each rank rolls out prompts_per_step / world prompts.
- Prompts render exactly as distill generate and distill eval render them (teacher.prompts with
  the student's chat template and the R1 instruction); the `<think>` prefill is put back
  before grading, so the format reward sees the whole reasoning block.
- Resume: the step, the data position, the weights (adapter only under LoRA), optimizer,
  scheduler and RNG are in each checkpoint; every sample's seed derives from (seed, position in
  the data stream, sample index) and the engines sample each request from its own seed, so a
  run killed and resumed follows the same trajectory as one that was not. metrics.jsonl is
  append-only, as in distill train: a resume is marked by an `{"event": "resume", "step": N}`
  line, the steps after the checkpoint are logged again, and readers count each step by its
  last record (distill.rundir.step_rows).
- Not done: no value model, no reference refresh, no length-normalised rewards beyond DAPO's
  penalty, no async rollouts (rollout and update alternate), no sequence parallelism.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from distill.config import Loaded, load_config
from distill.problems import Fields
from distill.rewards import RewardConfig
from distill.teacher.prompts import R1_INSTRUCTION


@dataclass(frozen=True)
class GRPOConfig:
    # what to train, on which problems, into which run directory
    student: str  # a preset (qwen-1.5b ... llama-70b), a hub id, or a local model directory
    data: str  # problems with reference answers: a file, a preset (gsm8k-train) or a hub dataset
    out: Path  # the run directory; rerunning the same command resumes from its last checkpoint
    data_dir: Optional[str] = None  # where presets' local copies live (else $DISTILL_DATA_DIR, else the hub)
    fields: Fields = field(default_factory=Fields)  # column names of a file or hub dataset (presets know theirs)
    on_bad_row: Literal["error", "skip"] = "error"
    limit: Optional[int] = None  # use only the first N problems

    # algorithm (None: the variant's choice; see distill.students.rl.VARIANTS)
    variant: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    scale_advantages: Optional[bool] = None
    aggregation: Optional[Literal["sequence", "token", "constant"]] = None
    epsilon_low: Optional[float] = None
    epsilon_high: Optional[float] = None
    dynamic_sampling: Optional[bool] = None
    overlong: Optional[Literal["none", "mask", "penalty"]] = None
    max_refills: int = 3  # dynamic sampling: extra rollouts per step to fill the batch (DAPO: max_num_gen_batches)
    beta: float = 0.0  # weight of the k3 KL penalty to the frozen initial policy

    # rollouts (the prompt is rendered as distill generate / eval render it)
    group_size: int = 16  # G: completions per prompt
    prompts_per_step: int = 32  # over all ranks
    max_tokens: int = 32768  # completion length cap (R1-Zero: 32768)
    temperature: float = 1.0
    top_p: float = 1.0
    engine: Literal["hf", "vllm"] = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)  # e.g. hf: batch_size; vllm: gpu_memory_utilization
    system: Optional[str] = None  # system prompt (None: whatever the chat template adds itself)
    instruction: Optional[str] = R1_INSTRUCTION  # appended to each problem
    chat_template: str = "auto"  # auto (the model's own) | chatml-think | chatml | llama3-think | llama3 | model | a .jinja file
    end_of_turn: Optional[str] = None  # token closing the assistant turn (default: the template's)

    # optimisation
    steps: int = 1000  # rollout steps
    mu: int = 1  # epochs over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch
    micro_batch_size: int = 4  # sequences per forward/backward
    lr: float = 3e-6  # DeepSeek-R1-Zero
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0  # rollout steps of linear warm-up (DAPO: 10)
    min_lr_ratio: float = 0.0  # cosine / linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    seed: int = 0

    # model and memory (the same knobs as distill train; a preset fills them in)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # compute dtype; auto: bf16 on GPU, fp32 on CPU
    rope_theta: Optional[float] = None
    max_position_embeddings: Optional[int] = None
    attn_implementation: str = "auto"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    loss_chunk_tokens: int = 1024  # positions per LM-head chunk of the log-prob computation
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    quantize: Literal["none", "4bit"] = "none"

    # rewards and verification
    rewards: RewardConfig = field(default_factory=RewardConfig)
    verifier_workers: Optional[int] = None
    verifier_timeout_s: float = 5.0
    # No box, no "answer is": "none" rewards it as wrong. The reward then also teaches the format the
    # prompt asks for (a boxed final answer), and a policy cannot score by ending on a guessed number.
    no_answer_fallback: Literal["none", "last"] = "none"

    # output
    save_every: int = 50  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    merge_lora: bool = True
    export_dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    def __post_init__(self) -> None:
        self._check_group_size()
        positive = ("prompts_per_step", "steps", "mu", "minibatches", "micro_batch_size", "max_tokens", "save_every",
                    "keep_checkpoints", "loss_chunk_tokens", "lora_r")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.beta < 0 or self.max_refills < 0 or self.warmup_steps < 0:
            raise ValueError("beta, max_refills and warmup_steps must be >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: RL samples, and the ratio needs the sampling distribution")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.quantize != "none" and not self.lora:
            raise ValueError("quantize=4bit is QLoRA: set lora=true too")

    def _check_group_size(self) -> None:
        # on-policy distillation (distill.students.onpolicy) relaxes this when it uses no reward
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages are relative to the other completions of a prompt")


# Settings that define a run's trajectory: resuming a run directory with others is refused.
LOCKED = (
    "student", "data", "limit", "variant", "scale_advantages", "aggregation", "epsilon_low", "epsilon_high", "dynamic_sampling",
    "overlong", "beta", "group_size", "prompts_per_step", "max_tokens", "temperature", "top_p", "system", "instruction",
    "chat_template", "steps", "mu", "minibatches", "lr", "schedule", "warmup_steps", "seed", "lora", "lora_r", "rewards",
)  # fmt: skip

# What a student preset brings to grpo: the model and its memory plan, not SFT's optimisation
# recipe (an RL learning rate is two orders of magnitude below a distillation one).
PRESET_KEYS = ("rope_theta", "max_position_embeddings", "chat_template", "lora", "quantize", "activation_checkpointing", "cpu_offload")


def load_grpo_config(recipe: str | Path | None = None, flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = (), cls: type = GRPOConfig) -> Loaded[GRPOConfig]:
    """The config (`cls`: GRPOConfig, or onpolicy's subclass) from defaults < preset < recipe <
    flags < key=value (see distill train)."""
    from distill.students.presets import is_preset, preset_values
    from distill.students.sft import visible_gpus

    first = load_config(cls, recipe=recipe, flags=flags, overrides=overrides)
    student = first.config.student
    if not is_preset(student):
        return first
    preset = {k: v for k, v in preset_values(student, visible_gpus()).items() if k in PRESET_KEYS}
    return load_config(cls, recipe=recipe, flags=flags, overrides=overrides, preset=preset, preset_name=student)


@dataclass
class Sample:
    """One completion of one prompt, with what the update needs."""

    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, the end-of-turn token included when it stopped
    text: str  # the full completion (the `<think>` prefill put back), as graded
    truncated: bool  # stopped at max_tokens
    reward: Any  # distill.rewards.Reward
    advantage: float = 0.0
    # set by a teacher (distill onpolicy): each token's own advantage (C,), which replaces
    # `advantage`, and the sampling policy's log-probs (C,) that it was computed from
    token_advantages: Any = None
    sampling_logprobs: Any = None


@dataclass
class Group:
    """The G completions of one prompt."""

    position: int  # the prompt's position in the data stream (epoch * len(problems) + index)
    problem_id: str
    samples: list[Sample]

    @property
    def known(self) -> list[Sample]:
        return [s for s in self.samples if s.reward.total is not None]


def sample_seed(seed: int, position: int, sample_index: int) -> int:
    """The seed of one completion: fixed by the run's seed and the completion's place in the data
    stream, so a resumed run samples exactly what an uninterrupted one would have."""
    digest = hashlib.sha256(f"grpo/{seed}/{position}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _reference(problem) -> str | None:
    """The problem's reference answer, None when it has none to check against."""
    return problem.answer if problem.answer and problem.answer.strip() else None


def run(cfg: GRPOConfig, sources: Mapping[str, str] | None = None, teacher: Any = None) -> dict[str, Any]:
    """Train and export. `teacher`: on-policy distillation's hook (distill.students.onpolicy.Teacher),
    which makes this loop `distill onpolicy`: after each rollout the teacher scores every sampled
    token and sets per-token advantages; None: GRPO."""
    from distill.students.parallel import close_distributed, init_distributed

    dist = init_distributed(cfg.dtype)
    try:
        return _train(cfg, sources, dist, teacher)
    finally:
        if dist.distributed:
            close_distributed()


def _train(cfg: GRPOConfig, sources: Mapping[str, str] | None, dist, teacher: Any = None) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from distill.engines import Request, Sampling, make_engine
    from distill.errors import ConfigError, InputError
    from distill.problems import load_problems
    from distill.rewards import score
    from distill.rundir import RunDir
    from distill.students import rl
    from distill.students.chat import apply_template, resolve_template
    from distill.students.checkpoint import Checkpointer, export_model
    from distill.students.parallel import load_sharded
    from distill.students.rl import PolicyScorer
    from distill.students.sft import export_dtype, build_optimizer, generation_config, load_student, lr_factor, processes, resolve_student, student_model_id, student_name
    from distill.teacher.prompts import full_completion, render_prompt
    from distill.verify import Verifier

    # ---- the algorithm, the run directory (rank 0 writes) -----------------------------------
    algorithm = rl.resolve(
        cfg.variant, scale_advantages=cfg.scale_advantages, aggregation=cfg.aggregation, epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high, dynamic_sampling=cfg.dynamic_sampling, overlong=cfg.overlong,
    )  # fmt: skip
    if cfg.prompts_per_step % dist.world:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {dist.world} processes (each rolls out its share)")
    local_prompts = cfg.prompts_per_step // dist.world
    student_model_id(cfg.student)  # a misspelt student is refused before anything is made or loaded
    stage = "grpo" if teacher is None else teacher.stage
    run_dir = RunDir(cfg.out, stage, cfg, sources, locked=LOCKED if teacher is None else teacher.locked) if dist.is_main else None

    def say(message: str) -> None:
        if run_dir is not None:
            run_dir.say(message)

    dist.barrier()
    if run_dir is not None:
        learner = student_name(cfg.student) + ("" if teacher is None else f" from teacher {cfg.teacher}")
        run_dir.announce(f"distill {stage}: {learner} on {cfg.data} -> {cfg.out}, {processes(dist)}", shown=("student", "teacher", "data", "out"))
    say(f"algorithm: {algorithm}, beta={cfg.beta}" + ("" if teacher is None else f"; {teacher.describe()}"))

    # ---- problems: a seeded permutation per epoch; a position in that stream names a prompt --
    loaded = load_problems(
        cfg.data, data_dir=cfg.data_dir, limit=cfg.limit, on_bad_row=cfg.on_bad_row,
        fields=None if cfg.fields == Fields() else cfg.fields,  # None: a preset's own field names
    )  # fmt: skip
    problems = loaded.problems
    if loaded.skipped:
        say(f"skipped {len(loaded.skipped)} bad rows of {cfg.data}; first: {loaded.skipped[0]}")
        if run_dir is not None:
            run_dir.warn_dropped("malformed", len(loaded.skipped), len(problems) + len(loaded.skipped), "problem rows skipped as malformed (on_bad_row=skip)", "fix those rows (the first is named above)")
    if not any(_reference(p) for p in problems) and (teacher is None or teacher.needs_rewards):
        raise InputError(f"{cfg.data}: no problem has a reference answer; the GRPO reward needs one (an 'answer' field)")
    say(f"{len(problems)} problems, {sum(1 for p in problems if not _reference(p))} without a reference (never rewarded)")
    orders: dict[int, list[int]] = {}

    def problem_at(position: int):
        epoch, index = divmod(position, len(problems))
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(problems), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
        return problems[orders[epoch][index]]

    # ---- student, chat template, policy, reference, optimiser (distill train's own code) -----
    model_id, hf_config = resolve_student(cfg.student)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if teacher is not None:  # a teacher that cannot score the student's tokens is refused before any model loads
        teacher.check_tokenizer(tokenizer, model_id)
    template = resolve_template(cfg.chat_template, tokenizer, cfg.end_of_turn)
    apply_template(tokenizer, template)  # prompts render with it; generation stops at its end of turn
    say(f"student {model_id}; chat template '{template.name}'")
    # Rank 0 reads the weights; the other ranks receive only their shards (parallel.load_sharded).
    policy = load_sharded(lambda meta: load_student(model_id, hf_config, cfg, dist, meta=meta), lambda lm: PolicyScorer(lm, cfg.loss_chunk_tokens), dist, cfg.cpu_offload)
    model = policy.model
    _disable_dropout(policy)  # old and new log-probs must come from the same function, not two dropout masks
    reference = None
    if cfg.beta > 0 and not cfg.lora:  # with LoRA the reference is the base: the adapter switched off
        reference = load_sharded(lambda meta: load_student(model_id, hf_config, cfg, dist, meta=meta), lambda lm: PolicyScorer(lm, cfg.loss_chunk_tokens), dist, cfg.cpu_offload)
        reference.requires_grad_(False)
        _disable_dropout(reference)
    parameters = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, parameters, dist.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if dist.distributed:  # FSDP initialises its root on the first call through it, not through a child
        _dummy_pass(policy, pad_id, dist)

    checkpointer = Checkpointer(Path(cfg.out) / "checkpoints", dist, cfg.keep_checkpoints)
    start_step, cursor = 0, 0
    latest = checkpointer.latest()
    if latest is not None:
        state = checkpointer.load(latest, policy, optimizer, scheduler)
        if state.get("problems") != len(problems):
            raise ConfigError(f"{cfg.out}: the problems changed since checkpoint {latest.name} ({state.get('problems')} -> {len(problems)}); use a new --out")
        start_step, cursor = int(state["step"]), int(state["cursor"])
        say(f"resuming from {latest.name}: step {start_step} of {cfg.steps}")
    model_dir = Path(cfg.out) / "model"
    if start_step >= cfg.steps and (model_dir / "config.json").is_file() and (Path(cfg.out) / "metrics.json").is_file():
        say(f"already trained ({cfg.steps} steps) and exported to {model_dir}; nothing to do")
        from distill.rundir import read_metrics

        return read_metrics(cfg.out)
    if run_dir is not None and start_step:
        run_dir.mark_resume(start_step)  # the steps logged after the checkpoint are redone, and logged again

    # ---- rollout engine and verifier ------------------------------------------------------------
    if cfg.engine == "hf":  # samples from the policy module itself: always the current weights
        engine = make_engine("hf", model_id, tokenizer=tokenizer, hf_model=model, **cfg.engine_options)
    else:  # vLLM in this process, beside the trainer; its weights are replaced after every update
        # sampled in the trainer's precision (vLLM's "auto" is bf16 on CPU too, the trainer's fp32 there)
        options = {"colocate": True, "seed": cfg.seed, "dtype": "bfloat16" if dist.mixed_precision else "float32", **cfg.engine_options}
        if dist.device.type == "cuda":  # the trainer keeps the rest of the GPU (on CPU the engine sizes its KV cache in GiB)
            options.setdefault("gpu_memory_utilization", 0.3)
        # the trainer's RoPE changes (the Qwen2.5-Math presets' 300k base, 32k positions) must
        # reach vLLM's copy of the model too, or it samples with another position encoding;
        # under transformers 5 the base lives in `rope_parameters` (load_student put it there)
        changed: dict[str, Any] = {}
        if cfg.rope_theta:
            parameters = getattr(hf_config, "rope_parameters", None)
            changed.update({"rope_parameters": dict(parameters)} if isinstance(parameters, dict) else {"rope_theta": cfg.rope_theta})
        if cfg.max_position_embeddings:
            changed["max_position_embeddings"] = cfg.max_position_embeddings
        if changed:
            options["extra"] = {"hf_overrides": changed, **(options.get("extra") or {})}
        engine = make_engine("vllm", model_id, tokenizer=tokenizer, **options)
        engine.load_weights(_policy_weights(model))  # a resumed run samples from its checkpoint, not the base
    if teacher is not None:
        teacher.start(dist)
    verifier = Verifier(workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s, no_answer_fallback=cfg.no_answer_fallback)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    rendered_cache: dict[str, Any] = {}

    def rollout(positions: list[int]) -> list[Group]:
        """G completions for each prompt, graded; advantages not yet set."""
        rendered_of, requests = {}, []
        for position in positions:
            problem = problem_at(position)
            if problem.id not in rendered_cache:
                rendered_cache[problem.id] = render_prompt(tokenizer, problem.problem, system=cfg.system, instruction=cfg.instruction)
            rendered_of[position] = rendered_cache[problem.id]
            for j in range(cfg.group_size):
                seed = sample_seed(cfg.seed, position, j)
                requests.append(Request(f"{position}/{j}", rendered_of[position].text, sampling, seed, rendered_of[position].messages))
        with _unsharded(policy, dist) if cfg.engine == "hf" else contextlib.nullcontext(), dist.autocast():
            completions = {c.key: c for c in engine.generate(requests)}
        failed = [k for k, c in completions.items() if c.finish_reason == "error"]
        if failed:
            raise RuntimeError(f"the {cfg.engine} engine failed on {len(failed)} requests, e.g. {failed[0]}: {completions[failed[0]].info}")
        ordered = [completions[r.key] for r in requests]
        positions_of = [int(r.key.split("/")[0]) for r in requests]
        texts = [full_completion(rendered_of[p], c.text) for p, c in zip(positions_of, ordered)]
        rewards = score(
            verifier, [_reference(problem_at(p)) for p in positions_of], texts, [len(c.token_ids or ()) for c in ordered],
            cfg.rewards, max_tokens=cfg.max_tokens, overlong_penalty=algorithm.overlong == "penalty",
        )  # fmt: skip
        groups = {p: Group(p, problem_at(p).id, []) for p in positions}
        prompt_ids = {p: _prompt_ids(tokenizer, rendered_of[p].text) for p in positions}
        for position, completion, text, reward in zip(positions_of, ordered, texts, rewards):
            assert completion.prompt_tokens == len(prompt_ids[position]), (
                f"the engine saw {completion.prompt_tokens} prompt tokens, the trainer {len(prompt_ids[position])}: both must tokenize the prompt the same way"
            )
            truncated = completion.finish_reason == "length"
            groups[position].samples.append(Sample(prompt_ids[position], list(completion.token_ids), text, truncated, reward))
        return [groups[p] for p in positions]

    # ---- the loop -------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    progress = tqdm(total=cfg.steps, initial=start_step, desc=stage, unit="step", disable=not dist.is_main)
    try:
        for step in range(start_step, cfg.steps):
            # rollout and reward: each rank its share of the step's prompts; DAPO's dynamic sampling
            # rolls out more prompts until every rank has a full share of informative groups
            started = time.perf_counter()
            rolled: list[Group] = []
            batch: list[Group] = []
            for attempt in range(1 + (cfg.max_refills if algorithm.dynamic_sampling else 0)):
                mine = cursor + dist.rank * local_prompts
                groups = rollout(list(range(mine, mine + local_prompts)))
                cursor += cfg.prompts_per_step
                rolled += groups
                kept = _assign_advantages(groups, algorithm, rl)
                batch += kept if teacher is None else groups  # the teacher's signal needs no reward: every group trains
                short = dist.sum([float(len(batch) < local_prompts)])[0]
                if not algorithm.dynamic_sampling or short == 0:
                    break
            batch = batch[:local_prompts]
            rollout_s = time.perf_counter() - started
            # on-policy distillation: the teacher scores every sampled token; per-token advantages
            scored = teacher.score(batch, policy, dist, pad_id) if teacher is not None else {}

            # update
            started = time.perf_counter()
            update = _optimise(policy, reference, optimizer, batch, algorithm, cfg, dist, step=step, pad_id=pad_id, rl=rl)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            if cfg.engine == "vllm":  # the next rollout samples from the new weights
                engine.load_weights(_policy_weights(model))
            update_s = time.perf_counter() - started

            record = {"step": step + 1, "data_position": cursor, **_rollout_metrics(rolled, batch, dist), **update, **scored, "lr": lr,
                      "rollout_s": round(rollout_s, 3), "update_s": round(update_s, 3)}  # fmt: skip
            history.append(record)
            if run_dir is not None:
                run_dir.log_metrics(record)
            shown = {} if teacher is None else {"rkl": _short(record["reverse_kl"])}
            progress.set_postfix(reward=_short(record["reward_mean"]), acc=_short(record["accuracy"]), len=_short(record["completion_length"], 0), **shown)
            progress.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                checkpointer.save(step + 1, policy, optimizer, scheduler, {"cursor": cursor, "problems": len(problems)})
    finally:  # also on Ctrl-C or a crash: no verifier workers or engine left behind
        progress.close()
        verifier.close()
        engine.close()
        if teacher is not None:
            teacher.close()

    # ---- the final model (what distill eval reads), the final figures ------------------------
    export_model(model, tokenizer, model_dir, dist, merge_lora=cfg.merge_lora, dtype=export_dtype(cfg, hf_config),
                 generation_config=generation_config(tokenizer, template, hf_config))  # fmt: skip
    last = history[-10:]
    final = {
        "student": cfg.student,
        "model_id": model_id,
        "model_dir": str(model_dir),
        "variant": cfg.variant,
        "algorithm": dict(algorithm.__dict__),
        "beta": cfg.beta,
        "steps": cfg.steps,
        "resumed_from_step": start_step or None,
        "data_position": cursor,
        "reward_mean_first": history[0]["reward_mean"] if history and not start_step else None,
        "reward_mean_last10": _mean([r["reward_mean"] for r in last]),
        "accuracy_last10": _mean([r["accuracy"] for r in last]),
        "completion_length_last10": _mean([r["completion_length"] for r in last]),
        "rollout_s_total": sum(r["rollout_s"] for r in history),
        "update_s_total": sum(r["update_s"] for r in history),
        # Tokens of the policy updates over every session (metrics.jsonl): what `distill compare`
        # shows as cost, next to the SFT run's trained tokens.
        "train_tokens": run_dir.step_total("trained_tokens") if run_dir is not None else None,
        "unverifiable_this_session": sum(r["unverifiable"] for r in history),
        "timeouts_this_session": sum(r["timeouts"] for r in history),
        "world_size": dist.world,
        "chat_template": template.name,
        **(teacher.summary(history, start_step, run_dir) if teacher is not None else {}),
    }
    if run_dir is not None:
        run_dir.write_metrics(final)
        distance = "" if teacher is None else f"reverse KL to the teacher {_short(final['reverse_kl_first'])} -> {_short(final['reverse_kl_last10'])}, "
        say(f"done: {cfg.steps} steps, {distance}mean reward {_short(final['reward_mean_first'])} -> {_short(final['reward_mean_last10'])} "
            f"(last 10 steps), accuracy {_short(final['accuracy_last10'])}; model in {model_dir}")
    return final


# ------------------------------------------------------------------------------------------------
# advantages and the update


def _disable_dropout(module) -> None:
    """Dropout probabilities to 0 (nn.Dropout layers and attention dropout). The module stays in
    training mode: transformers applies activation checkpointing only in training mode."""
    import torch

    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0
        if isinstance(getattr(sub, "attention_dropout", None), float):
            sub.attention_dropout = 0.0
    module.train()


def _assign_advantages(groups: list[Group], algorithm, rl) -> list[Group]:
    """Set each sample's advantage; return the groups that go into the update.

    Left out: groups with fewer than two known rewards (nothing to compare), and under dynamic
    sampling the groups whose known rewards are all equal.
    """
    import torch

    rewards = torch.tensor([[s.reward.total if s.reward.total is not None else 0.0 for s in g.samples] for g in groups], dtype=torch.float64)  # (P, G)
    valid = torch.tensor([[s.reward.total is not None for s in g.samples] for g in groups])  # (P, G)
    advantages = rl.group_advantages(rewards, valid, scale=algorithm.scale_advantages)  # (P, G)
    informative = rl.informative_groups(rewards, valid)  # (P,)
    kept = []
    for group, row, useful, known in zip(groups, advantages.tolist(), informative.tolist(), valid.sum(dim=1).tolist()):
        for sample, advantage in zip(group.samples, row):
            sample.advantage = advantage
        if known < 2 or (algorithm.dynamic_sampling and not useful):
            continue
        kept.append(group)
    return kept


def _optimise(policy, reference, optimizer, batch: list[Group], algorithm, cfg: GRPOConfig, dist, *, step: int, pad_id: int, rl) -> dict[str, Any]:
    """mu epochs over this rank's share of the batch, each split into `minibatches` optimizer
    steps of accumulated micro-batches. Every rank runs the same number of forward, backward
    and optimizer steps (FSDP's collectives need it): a rank with fewer sequences runs empty
    micro-batches. Returns the update's figures, summed over ranks."""
    import torch

    # a sample trains when its reward is known, or when a teacher gave its tokens advantages
    sequences = [s for group in batch for s in group.samples if s.token_advantages is not None or s.reward.total is not None]
    # DAPO's overlong filtering: a truncated completion keeps its place in its group's
    # statistics, but none of its tokens is trained on
    loss_tokens = [0 if algorithm.overlong == "mask" and s.truncated else len(s.completion_ids) for s in sequences]
    total = int(dist.sum([float(len(sequences))])[0])
    if total == 0:
        return {"optimizer_steps": 0, "loss": None, "grad_norm": None, "clip_fraction": None, "clip_fraction_low": None,
                "clip_fraction_high": None, "entropy": None, "kl_old": None, "kl_ref": None, "trained_tokens": 0}  # fmt: skip
    parts = min(cfg.minibatches, total)
    # log-probs under the policy that sampled (needed only when it changes between updates) and
    # under the reference (only with a KL term); computed before any update
    old = None
    if cfg.mu * parts > 1:  # a teacher's hook has them already (every rank alike)
        stored = [s.sampling_logprobs for s in sequences]
        old = stored if all(x is not None for x in stored) else _sequence_logprobs(policy, sequences, cfg, dist, pad_id)
    ref = None
    if cfg.beta > 0:
        if reference is None:  # LoRA: the base model is the reference
            with causal_lm_of(policy).disable_adapter():
                ref = _sequence_logprobs(policy, sequences, cfg, dist, pad_id)
        else:
            ref = _sequence_logprobs(reference, sequences, cfg, dist, pad_id)

    parameters = [p for p in policy.parameters() if p.requires_grad]
    sums = dict(tokens=0.0, clipped=0.0, clipped_low=0.0, clipped_high=0.0, kl=0.0, kl_old=0.0, entropy=0.0, entropy_tokens=0.0, loss=0.0)
    norms = []
    for epoch in range(cfg.mu):
        generator = torch.Generator().manual_seed(sample_seed(cfg.seed, step, 1_000_000 + epoch * 1000 + dist.rank))
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for part in _split(order, parts):
            counts = [loss_tokens[i] for i in part]
            totals = dist.sum([float(len(part)), float(sum(1 for c in counts if c > 0)), float(sum(counts))])
            weights = rl.sequence_weights(torch.tensor(counts, dtype=torch.float64), algorithm.aggregation, max_tokens=cfg.max_tokens, totals=totals)
            micro_batches = int(dist.max(float(math.ceil(len(part) / cfg.micro_batch_size))))
            for m in range(micro_batches):
                index = part[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
                if not index:  # this rank has run out: an empty pass keeps FSDP's collectives in step
                    _dummy_pass(policy, pad_id, dist, backward=True)
                    continue
                micro = [sequences[i] for i in index]
                batch_tensors = _collate(micro, [loss_tokens[i] for i in index], pad_id, dist.device)
                with dist.autocast():
                    logprobs, entropy = policy(*batch_tensors[:3], temperature=cfg.temperature, with_entropy=epoch == 0)
                logprobs = logprobs.gather(1, batch_tensors[3])  # (b, C) the completion tokens
                mask = batch_tensors[4]
                old_logprobs = _stack([old[i] for i in index], mask) if old is not None else logprobs.detach()
                ref_logprobs = _stack([ref[i] for i in index], mask) if ref is not None else None
                if micro[0].token_advantages is not None:  # (b, C) one per token (a teacher's)
                    advantages = _stack([s.token_advantages for s in micro], mask)
                else:  # (b,) one per sequence
                    advantages = torch.tensor([s.advantage for s in micro], device=dist.device)
                loss, stats = rl.policy_loss(
                    logprobs, old_logprobs, advantages, mask, weights[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size].to(dist.device),
                    epsilon_low=algorithm.epsilon_low, epsilon_high=algorithm.epsilon_high, beta=cfg.beta, ref_logprobs=ref_logprobs,
                )  # fmt: skip
                # FSDP averages gradients over ranks; the weights already divide by global totals
                (loss * dist.world).backward()
                sums["loss"] += float(loss.detach())
                for key in ("tokens", "clipped", "clipped_low", "clipped_high", "kl"):
                    sums[key] += getattr(stats, key)
                with torch.no_grad():  # how far the policy has moved from the one that sampled (k3)
                    delta = old_logprobs - logprobs.detach()
                    sums["kl_old"] += float(((torch.exp(delta) - delta - 1) * mask).sum())
                    if entropy is not None:
                        sums["entropy"] += float((entropy.gather(1, batch_tensors[3]) * mask).sum())
                        sums["entropy_tokens"] += float(mask.sum())
            norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if math.isfinite(norm):  # a non-finite gradient is never applied
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            norms.append(norm)
    keys = list(sums)
    sums = dict(zip(keys, dist.sum([sums[k] for k in keys])))
    tokens = max(sums["tokens"], 1.0)
    return {
        "optimizer_steps": len(norms),
        "loss": sums["loss"] / len(norms),  # the surrogate (+ KL) per optimizer step, summed over ranks
        "grad_norm": _mean(norms),
        "clip_fraction": sums["clipped"] / tokens,
        "clip_fraction_low": sums["clipped_low"] / tokens,
        "clip_fraction_high": sums["clipped_high"] / tokens,
        "entropy": sums["entropy"] / sums["entropy_tokens"] if sums["entropy_tokens"] else None,
        "kl_old": sums["kl_old"] / tokens,
        "kl_ref": sums["kl"] / tokens if cfg.beta > 0 else None,
        "trained_tokens": int(sums["tokens"] / cfg.mu),
    }


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in `parts` contiguous pieces whose sizes differ by at most one (some may be empty)."""
    size, extra = divmod(len(items), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(items[start:end])
        start = end
    return pieces


def _collate(sequences: list[Sample], loss_tokens: list[int], pad_id: int, device):
    """Tensors of one micro-batch:
    input_ids (b, L) prompt + completion, right-padded; attention (b, L);
    targets (b, L): the next token where it is a completion token, IGNORE elsewhere (so only
      completion positions go through the LM head);
    index (b, C): the position predicting each completion token; mask (b, C): 1 on loss tokens."""
    import torch

    from distill.students.logprobs import IGNORE

    length = max(len(s.prompt_ids) + len(s.completion_ids) for s in sequences)
    width = max(max(len(s.completion_ids) for s in sequences), 1)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    targets = torch.full((len(sequences), length), IGNORE, dtype=torch.long)
    index = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width))
    for row, (sample, count) in enumerate(zip(sequences, loss_tokens)):
        prompt, completion = len(sample.prompt_ids), len(sample.completion_ids)
        input_ids[row, : prompt + completion] = torch.tensor(sample.prompt_ids + sample.completion_ids)
        attention[row, : prompt + completion] = 1
        targets[row, prompt - 1 : prompt - 1 + completion] = torch.tensor(sample.completion_ids)
        index[row, :completion] = torch.arange(prompt - 1, prompt - 1 + completion)
        mask[row, :count] = 1.0
    return tuple(t.to(device) for t in (input_ids, attention, targets, index, mask))


def _stack(rows, mask):
    """Per-sequence 1-D log-prob tensors, right-padded to the mask's (b, C)."""
    import torch

    out = torch.zeros(mask.shape, device=mask.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row.to(mask.device)
    return out


def _sequence_logprobs(scorer, sequences: list[Sample], cfg: GRPOConfig, dist, pad_id: int) -> list:
    """Log-probs of each sequence's completion tokens under `scorer`, without gradients (the
    same number of passes on every rank)."""
    import torch

    result = []
    passes = int(dist.max(float(math.ceil(len(sequences) / cfg.micro_batch_size))))
    with torch.no_grad():
        for m in range(passes):
            micro = sequences[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
            if not micro:
                _dummy_pass(scorer, pad_id, dist)
                continue
            input_ids, attention, targets, index, _ = _collate(micro, [len(s.completion_ids) for s in micro], pad_id, dist.device)
            with dist.autocast():
                logprobs, _ = scorer(input_ids, attention, targets, temperature=cfg.temperature)
            logprobs = logprobs.gather(1, index).float().cpu()
            result += [logprobs[i, : len(s.completion_ids)] for i, s in enumerate(micro)]
    return result


def _dummy_pass(scorer, pad_id: int, dist, backward: bool = False) -> None:
    """A two-token pass with no target: it moves nothing, but takes part in FSDP's collectives."""
    import torch

    from distill.students.logprobs import IGNORE

    input_ids = torch.full((1, 2), pad_id, dtype=torch.long, device=dist.device)
    targets = torch.full((1, 2), IGNORE, dtype=torch.long, device=dist.device)
    with torch.set_grad_enabled(backward), dist.autocast():
        logprobs, _ = scorer(input_ids, torch.ones_like(input_ids), targets)
    if backward:
        (logprobs.sum() * 0.0).backward()


# ------------------------------------------------------------------------------------------------
# the policy's weights, for generation


def causal_lm_of(scorer):
    """The (possibly peft-wrapped) causal LM inside a Scorer."""
    return scorer.model


@contextlib.contextmanager
def _unsharded(scorer, dist):
    """Whole parameters on every rank for the duration of a rollout (FSDP only).

    The hf engine calls the model once per generated token, and ranks generate different
    numbers of tokens: per-layer all-gathers would deadlock. So every FSDP unit is gathered
    once, kept gathered through the rollout, and resharded after.
    """
    if not dist.distributed:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in scorer.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in units if m is not scorer]
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)


def _policy_weights(model):
    """(name, tensor) pairs of the policy under the base model's parameter names, for vLLM.

    LoRA: the adapter is merged into the base weights for the copy and unmerged after (as TRL's
    colocate mode does), and peft's name prefixes are dropped. Sharded (FSDP2) parameters are
    gathered one at a time (every rank must iterate).
    """
    import torch

    from distill.students.checkpoint import is_quantized, merged_weights

    if is_quantized(model):  # QLoRA: dequantised and merged without touching the 4-bit base
        yield from merged_weights(model).items()
        return
    lora = hasattr(model, "merge_adapter")
    if lora:
        model.merge_adapter()
    try:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if lora:
                    if "lora_" in name or "modules_to_save" in name:
                        continue
                    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                if hasattr(tensor, "full_tensor"):  # a DTensor shard of FSDP2
                    tensor = tensor.full_tensor()
                yield name, tensor
    finally:
        if lora:
            model.unmerge_adapter()


def _prompt_ids(tokenizer, text: str) -> list[int]:
    # the engines encode the same way: the rendered text already holds the template's special
    # tokens (BOS included where it has one)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------
# figures


def _rollout_metrics(rolled: list[Group], batch: list[Group], dist) -> dict[str, Any]:
    """Figures of the step's rollouts, over all ranks."""
    samples = [s for g in rolled for s in g.samples]
    known = [s.reward.total for s in samples if s.reward.total is not None]
    graded = [s.reward.correct for s in samples if s.reward.correct is not None]
    solved = [[s.reward.correct for s in g.samples if s.reward.correct is not None] for g in rolled]
    names = ["completions", "known", "reward", "reward_sq", "graded", "correct", "formatted", "length", "truncated", "overlong",
             "repetition", "groups", "groups_trained", "all_correct", "all_wrong", "unverifiable", "timeouts"]  # fmt: skip
    values = [
        len(samples), len(known), sum(known), sum(r * r for r in known), len(graded), sum(graded),
        sum(s.reward.formatted for s in samples), sum(len(s.completion_ids) for s in samples), sum(s.truncated for s in samples),
        sum(s.reward.overlong for s in samples), sum(s.reward.repetition for s in samples), len(rolled), len(batch),
        sum(1 for g in solved if g and all(g)), sum(1 for g in solved if g and not any(g)),
        sum(1 for s in samples if s.reward.reason in ("no_reference", "bad_reference")), sum(1 for s in samples if s.reward.reason == "timeout"),
    ]  # fmt: skip
    t = dict(zip(names, dist.sum([float(v) for v in values])))
    n = max(t["completions"], 1.0)
    mean = t["reward"] / t["known"] if t["known"] else None
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(max(t["reward_sq"] / t["known"] - mean * mean, 0.0)) if t["known"] else None,
        "accuracy": t["correct"] / t["graded"] if t["graded"] else None,
        "format_rate": t["formatted"] / n,
        "completion_length": t["length"] / n,
        "truncation_rate": t["truncated"] / n,
        "overlong_penalty": t["overlong"] / n,
        "repetition_penalty": t["repetition"] / n,
        "completions": int(t["completions"]),
        "groups": int(t["groups"]),
        "groups_trained": int(t["groups_trained"]),
        "groups_all_correct": int(t["all_correct"]),
        "groups_all_wrong": int(t["all_wrong"]),
        "unverifiable": int(t["unverifiable"]),
        "timeouts": int(t["timeouts"]),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _short(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

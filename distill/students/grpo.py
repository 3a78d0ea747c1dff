"""distill grpo: the RL-only baseline, GRPO and its common variants, rewarded by the shared verifier.

    distill grpo --student qwen-1.5b --data gsm8k-train --out runs/grpo [--recipe R.yaml] [key=value ...]

The DeepSeek-R1 paper's central comparison is distillation against RL from the same base; this
stage is the RL side, kept faithful and small enough to read top to bottom:

    for step in range(steps):
        rollout   P prompts x G completions through the shared engine layer (hf or vllm)
        reward    the shared verifier (accuracy) + format + optional length / repetition terms
        advantage group-relative: (r - mean) [/ std] over each prompt's G completions
        update    mu epochs over the batch, split into `minibatches` optimizer steps, each
                  accumulated over micro-batches: clipped-ratio surrogate [+ beta * k3 KL]
        log       metrics.jsonl, progress bar; checkpoint every `save_every` steps

Variants (`variant=`; each knob can be overridden on its own, see distill.students.rl):
    grpo     DeepSeekMath / R1-Zero: std-normalised advantages, per-sequence token mean
    dr_grpo  Dr. GRPO: no std normalisation, token sum over a constant (N * max_tokens)
    dapo     DAPO: clip-higher (0.2 / 0.28), token-level mean over the batch, dynamic sampling
             (groups with all-equal rewards dropped and more prompts sampled, at most
             `max_refills` extra rollouts per step), soft overlong punishment (or `overlong=mask`)

Choices, and how this differs from the papers:
- Defaults follow DeepSeek-R1-Zero where the paper gives them: G = 16 completions per prompt,
  32 prompts per step, sampling temperature 1.0, learning rate 3e-6, a rule-based reward of
  accuracy and format. beta (the KL weight) is 0 by default, as DAPO and Dr. GRPO recommend; R1
  used 0.001, DeepSeekMath 0.04. With beta > 0 the reference is the initial policy, frozen (R1
  refreshed it every 400 steps; we do not).
- R1 split each rollout of 8192 completions into 16 mini-batches for one epoch; here one step's
  rollout is `prompts_per_step * group_size` completions and `minibatches`, `mu` say how many
  optimizer steps it feeds (default 1 and 1: strictly on-policy, so the ratio is exactly 1 and
  nothing is clipped; raise them to reuse rollouts, as DAPO's 16 updates per rollout do).
- Log-probs for the ratio are recomputed by the trainer (never taken from the engine), at the
  sampling temperature; the old policy's log-probs come from a no-grad pass before the first
  update of a step (skipped when there is a single update: then old = current, detached).
- Dropout is off during RL (the model stays in eval mode): the ratio must compare one function
  under two sets of weights, not two random masks.
- Completions whose reward is unknown (no or unparseable reference, verifier timeout) are left
  out of the advantage statistics and the loss, and counted (`unverifiable`, `timeouts`); a
  group with fewer than two known rewards trains nothing.
- Groups whose rewards are all equal have zero advantage; grpo and dr_grpo keep them (their tokens
  still count in the normaliser, as in the papers); dapo drops them.
- Gradient accumulation is exact: each optimizer step's normaliser is computed over its whole
  mini-batch before the micro-batches run (distill.students.rl.sequence_weights).
- Optimizer: AdamW, constant learning rate after `warmup_steps` of linear warm-up, gradients
  clipped to `max_grad_norm`; no entropy bonus, no reward normalisation across batches.
- The prompt is the one `distill generate` and `distill eval` render (distill.teacher.prompts):
  the student's chat template, the R1 instruction, the `<think>` prefill put back before grading.
- Resume: the step, the data cursor, the model, the optimizer and the scheduler are saved in
  one checkpoint; every sample's seed derives from (seed, data position, sample index), so a run
  that is killed and resumed follows the same trajectory as one that was not.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from distill.problems import Fields
from distill.rewards import RewardConfig

R1_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class GRPOConfig:
    # what to train, on which problems, into which run directory
    student: str  # a preset name (qwen-1.5b, ...) or a model path / hub id
    data: str  # problems with reference answers: a file, a preset (gsm8k-train) or a hub dataset
    out: Path
    data_dir: Optional[str] = None  # where presets' local copies live (else $DISTILL_DATA_DIR, else the hub)
    limit: Optional[int] = None  # use only the first N problems
    fields: Fields = field(default_factory=Fields)  # column names of a file or hub dataset (presets know theirs)
    on_bad_row: Literal["error", "skip"] = "error"

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

    # rollouts
    group_size: int = 16  # G: completions per prompt
    prompts_per_step: int = 32
    max_tokens: int = 32768  # completion length cap (R1-Zero: 32768)
    temperature: float = 1.0
    top_p: float = 1.0
    engine: Literal["hf", "vllm"] = "hf"
    engine_options: dict[str, Any] = field(default_factory=dict)  # passed to the engine (e.g. gpu_memory_utilization)
    system: Optional[str] = None  # system prompt (None: whatever the chat template adds itself)
    instruction: Optional[str] = R1_INSTRUCTION  # appended to each problem
    chat_template: Optional[str] = None  # override the student's template (jinja text, file or tokenizer_config.json)

    # optimisation
    steps: int = 1000  # rollout steps
    mu: int = 1  # epochs over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch
    micro_batch_size: int = 4  # sequences per forward/backward
    learning_rate: float = 3e-6
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: int = 32
    gradient_checkpointing: bool = False

    # rewards and verification
    rewards: RewardConfig = field(default_factory=RewardConfig)
    verifier_workers: Optional[int] = None
    verifier_timeout_s: float = 5.0

    # bookkeeping
    seed: int = 0
    save_every: int = 50  # steps between checkpoints (and at the end)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("group_size must be at least 2: advantages are relative to the other completions of a prompt")
        for name in ("prompts_per_step", "steps", "mu", "minibatches", "micro_batch_size", "max_tokens", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.prompts_per_step * self.group_size < self.minibatches:
            raise ValueError("minibatches cannot exceed prompts_per_step * group_size (each optimizer step needs a sequence)")
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (RL samples; the ratio needs the sampling distribution)")


# Settings that define what a run directory's checkpoints mean: resuming with others is refused.
LOCKED = ("student", "data", "variant", "group_size", "prompts_per_step", "seed", "lora_rank")


@dataclass
class Sample:
    """One completion of one prompt, with what the update needs."""

    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, the end-of-sequence token included when it stopped
    text: str  # the full completion (the `<think>` prefill put back), as graded
    truncated: bool  # stopped at max_tokens
    reward: Any  # distill.rewards.Reward
    advantage: float = 0.0


@dataclass
class Group:
    """The G completions of one prompt."""

    position: int  # the prompt's position in the data stream (epoch * len(problems) + index)
    problem_id: str
    samples: list[Sample]

    @property
    def known(self) -> list[Sample]:
        return [s for s in self.samples if s.reward.total is not None]


def _reference(problem) -> str | None:
    """The problem's reference answer, None when it has none to check against."""
    return problem.answer if problem.answer and problem.answer.strip() else None


def sample_seed(seed: int, position: int, sample_index: int) -> int:
    """The seed of one completion: fixed by the run's seed and the completion's place in the data
    stream, so a resumed run samples exactly what an uninterrupted one would have."""
    digest = hashlib.sha256(f"grpo/{seed}/{position}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run(cfg: GRPOConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from distill.engines import Request, Sampling, make_engine
    from distill.errors import InputError
    from distill.problems import load_problems
    from distill.rewards import score
    from distill.rundir import RunDir
    from distill.students import rl
    from distill.teacher.prompts import full_completion, load_chat_template, render_prompt
    from distill.verify import Verifier

    # ---- the algorithm, the run directory -------------------------------------------------
    algorithm = rl.resolve(
        cfg.variant,
        scale_advantages=cfg.scale_advantages,
        aggregation=cfg.aggregation,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        dynamic_sampling=cfg.dynamic_sampling,
        overlong=cfg.overlong,
    )
    run_dir = RunDir(cfg.out, "grpo", cfg, sources, locked=LOCKED)
    run_dir.say(f"distill grpo: {algorithm} beta={cfg.beta} into {run_dir.path}")

    # ---- problems ---------------------------------------------------------------------------
    loaded = load_problems(
        cfg.data, data_dir=cfg.data_dir, limit=cfg.limit, on_bad_row=cfg.on_bad_row,
        fields=None if cfg.fields == Fields() else cfg.fields,  # None: a preset's own field names
    )
    problems = loaded.problems
    for reason in loaded.skipped:
        run_dir.log.info(f"skipped: {reason}")
    if loaded.skipped:
        run_dir.say(f"skipped {len(loaded.skipped)} bad rows of {cfg.data} (listed in grpo.log)")
    if not any(_reference(p) for p in problems):
        raise InputError(f"{cfg.data}: no problem has a reference answer; the GRPO reward needs one (an 'answer' field)")
    orders: dict[int, list[int]] = {}

    def problem_at(position: int):
        """The data stream: each epoch a fresh seeded permutation of the problems."""
        epoch, index = divmod(position, len(problems))
        if epoch not in orders:
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(len(problems), generator=generator).tolist()
        return problems[orders[epoch][index]]

    # ---- the policy, its optimizer, the frozen reference ------------------------------------
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, policy = _load_student(cfg, device)
    if cfg.chat_template:
        tokenizer.chat_template = load_chat_template(cfg.chat_template)
    policy.eval()  # dropout off: old and new log-probs must come from the same function
    reference = _frozen_copy(policy) if cfg.beta > 0 and cfg.lora_rank == 0 else None
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: min(1.0, (update + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    start_step, cursor = _resume(run_dir, policy, optimizer, scheduler)
    if start_step:
        run_dir.say(f"resumed at step {start_step} (data position {cursor})")

    engine = make_engine(cfg.engine, cfg.student, tokenizer=tokenizer, hf_model=policy, **cfg.engine_options)
    verifier = Verifier(workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    rendered_cache: dict[str, Any] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def rollout(positions: list[int]) -> list[Group]:
        """G completions for each prompt, graded; advantages not yet set."""
        requests, rendered_of = [], {}
        for position in positions:
            problem = problem_at(position)
            if problem.id not in rendered_cache:
                rendered_cache[problem.id] = render_prompt(tokenizer, problem.problem, system=cfg.system, instruction=cfg.instruction)
            rendered_of[position] = rendered_cache[problem.id]
            for j in range(cfg.group_size):
                requests.append(
                    Request(
                        key=f"{position}/{j}",
                        prompt=rendered_of[position].text,
                        sampling=sampling,
                        seed=sample_seed(cfg.seed, position, j),
                        messages=rendered_of[position].messages,
                    )
                )
        completions = {c.key: c for c in engine.generate(requests)}
        texts, references, lengths, keys = [], [], [], []
        for request in requests:
            completion = completions[request.key]
            if completion.finish_reason == "error":
                raise RuntimeError(f"the {cfg.engine} engine failed on {request.key}: {completion.info}")
            position = int(request.key.split("/")[0])
            texts.append(full_completion(rendered_of[position], completion.text))
            references.append(_reference(problem_at(position)))
            lengths.append(len(completion.token_ids))
            keys.append(request.key)
        rewards = score(
            verifier, references, texts, lengths, cfg.rewards,
            max_tokens=cfg.max_tokens, overlong_penalty=algorithm.overlong == "penalty",
        )
        groups: dict[int, Group] = {}
        for key, text, reward in zip(keys, texts, rewards):
            position = int(key.split("/")[0])
            completion = completions[key]
            prompt_ids = _prompt_ids(tokenizer, rendered_of[position].text)
            assert completion.prompt_tokens in (0, len(prompt_ids)), (
                f"the engine saw {completion.prompt_tokens} prompt tokens, the trainer {len(prompt_ids)}: "
                "both must tokenize the prompt the same way"
            )
            group = groups.setdefault(position, Group(position, problem_at(position).id, []))
            group.samples.append(
                Sample(prompt_ids, list(completion.token_ids), text, completion.finish_reason == "length", reward)
            )
        return [groups[p] for p in positions]

    # ---- the loop -----------------------------------------------------------------------------
    totals = {"unverifiable": 0, "timeouts": 0, "rollouts": 0}
    history: list[dict[str, Any]] = []
    progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="grpo", unit="step", dynamic_ncols=True)
    for step in progress:
        # rollout and reward; DAPO's dynamic sampling rolls out more prompts until the batch is full
        started = time.perf_counter()
        rolled: list[Group] = []
        batch: list[Group] = []
        for attempt in range(1 + (cfg.max_refills if algorithm.dynamic_sampling else 0)):
            groups = rollout(list(range(cursor, cursor + cfg.prompts_per_step)))
            cursor += cfg.prompts_per_step
            rolled += groups
            batch += _assign_advantages(groups, algorithm, rl)
            if not algorithm.dynamic_sampling or len(batch) >= cfg.prompts_per_step:
                break
        batch = batch[: cfg.prompts_per_step]
        rollout_s = time.perf_counter() - started

        # update
        started = time.perf_counter()
        update = _optimise(
            policy, reference, optimizer, scheduler, batch, algorithm, cfg,
            step=step, pad_id=pad_id, device=device, rl=rl,
        )
        if hasattr(engine, "update_weights"):  # a colocated vLLM engine samples the next step from the new weights
            engine.update_weights(policy)
        update_s = time.perf_counter() - started

        record = {"step": step + 1, "data_position": cursor, **_rollout_metrics(rolled, batch), **update,
                  "rollout_s": round(rollout_s, 3), "update_s": round(update_s, 3)}
        totals["unverifiable"] += record["unverifiable"]
        totals["timeouts"] += record["timeouts"]
        totals["rollouts"] += record["completions"]
        run_dir.log_metrics(record)
        history.append(record)
        progress.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.3f}", len=f"{record['completion_length']:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save(run_dir, policy, optimizer, scheduler, step + 1, cursor)
    progress.close()
    verifier.close()
    engine.close()

    # ---- the final model, the final figures -------------------------------------------------
    model_dir = _export(run_dir, policy, tokenizer)
    last = history[-10:] or [{}]
    final = {
        "variant": cfg.variant,
        "algorithm": algorithm.__dict__,
        "steps": cfg.steps,
        "model_dir": str(model_dir),
        "reward_mean_last10": _mean([r.get("reward_mean") for r in last]),
        "accuracy_last10": _mean([r.get("accuracy") for r in last]),
        **{f"{k}_this_session": v for k, v in totals.items()},
    }
    run_dir.write_metrics(final)
    run_dir.say(f"done: model in {model_dir}")
    return final


# ------------------------------------------------------------------------------------------------
# advantages and the update


def _assign_advantages(groups: list[Group], algorithm, rl) -> list[Group]:
    """Set each sample's advantage; return the groups that go into the update.

    Left out: groups with fewer than two known rewards (nothing to compare), and under dynamic
    sampling the groups whose known rewards are all equal.
    """
    import torch

    rewards = torch.tensor(
        [[s.reward.total if s.reward.total is not None else 0.0 for s in g.samples] for g in groups], dtype=torch.float64
    )  # (P, G)
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


def _optimise(policy, reference, optimizer, scheduler, batch: list[Group], algorithm, cfg: GRPOConfig, *, step, pad_id, device, rl) -> dict[str, Any]:
    """mu epochs over the batch, each split into `minibatches` optimizer steps of accumulated
    micro-batches. Returns the update's figures (token means over every pass)."""
    import torch

    sequences = [s for group in batch for s in group.known]
    if not sequences:
        return {"optimizer_steps": 0, "loss": None, "grad_norm": None, "clip_fraction": None, "entropy": None,
                "kl_old": None, "kl_ref": None, "lr": scheduler.get_last_lr()[0]}
    # DAPO's overlong filtering: a truncated completion keeps its place in its group's
    # statistics but none of its tokens are trained on
    loss_tokens = [0 if algorithm.overlong == "mask" and s.truncated else len(s.completion_ids) for s in sequences]
    updates = cfg.mu * min(cfg.minibatches, len(sequences))
    # log-probs under the policy that sampled (only needed when it changes between updates)
    # and under the reference (only with a KL term)
    old = _sequence_logprobs(policy, sequences, cfg, pad_id, device) if updates > 1 else None
    ref = None
    if cfg.beta > 0:
        if reference is None:  # LoRA: the reference is the base model, i.e. the adapter switched off
            with policy.disable_adapter():
                ref = _sequence_logprobs(policy, sequences, cfg, pad_id, device)
        else:
            ref = _sequence_logprobs(reference, sequences, cfg, pad_id, device)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    sums = {"tokens": 0.0, "clipped": 0.0, "clipped_low": 0.0, "clipped_high": 0.0, "kl": 0.0, "kl_old": 0.0}
    entropy_sum, entropy_tokens, losses, norms = 0.0, 0.0, [], []
    for epoch in range(cfg.mu):
        generator = torch.Generator().manual_seed(sample_seed(cfg.seed, step, 1_000_000 + epoch))
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for part in _split(order, min(cfg.minibatches, len(sequences))):
            counts = torch.tensor([loss_tokens[i] for i in part])
            weights = rl.sequence_weights(counts, algorithm.aggregation, max_tokens=cfg.max_tokens)  # (n,)
            minibatch_loss = 0.0
            for offset in range(0, len(part), cfg.micro_batch_size):
                index = part[offset : offset + cfg.micro_batch_size]
                micro = [sequences[i] for i in index]
                input_ids, attention, starts, mask = _collate(micro, [loss_tokens[i] for i in index], pad_id, device)
                logprobs, entropy = _completion_logprobs(policy, input_ids, attention, starts, mask.shape[1], cfg.temperature, with_entropy=epoch == 0)
                old_logprobs = _stack([old[i] for i in index], mask) if old is not None else logprobs.detach()
                ref_logprobs = _stack([ref[i] for i in index], mask) if ref is not None else None
                advantages = torch.tensor([s.advantage for s in micro], device=device)
                loss, stats = rl.policy_loss(
                    logprobs, old_logprobs, advantages, mask,
                    weights[offset : offset + cfg.micro_batch_size].to(device),
                    epsilon_low=algorithm.epsilon_low, epsilon_high=algorithm.epsilon_high,
                    beta=cfg.beta, ref_logprobs=ref_logprobs,
                )
                loss.backward()
                minibatch_loss += loss.item()
                for key in ("tokens", "clipped", "clipped_low", "clipped_high", "kl"):
                    sums[key] += getattr(stats, key)
                with torch.no_grad():  # how far the policy has moved from the one that sampled (k3)
                    delta = old_logprobs - logprobs.detach()
                    sums["kl_old"] += float(((torch.exp(delta) - delta - 1) * mask).sum())
                if entropy is not None:
                    entropy_sum += float((entropy * mask).sum())
                    entropy_tokens += float(mask.sum())
            norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(minibatch_loss)
    tokens = max(sums["tokens"], 1.0)
    return {
        "optimizer_steps": len(losses),
        "loss": _mean(losses),
        "grad_norm": _mean(norms),
        "clip_fraction": sums["clipped"] / tokens,
        "clip_fraction_low": sums["clipped_low"] / tokens,
        "clip_fraction_high": sums["clipped_high"] / tokens,
        "entropy": entropy_sum / entropy_tokens if entropy_tokens else None,
        "kl_old": sums["kl_old"] / tokens,
        "kl_ref": sums["kl"] / tokens if cfg.beta > 0 else None,
        "trained_tokens": int(sum(loss_tokens)),
        "lr": scheduler.get_last_lr()[0],
    }


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in `parts` contiguous pieces whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(items[start:end])
        start = end
    return pieces


def _collate(sequences: list[Sample], loss_tokens: list[int], pad_id: int, device):
    """Right-padded prompt + completion ids (b, L), their attention mask (b, L), where each
    completion starts (b,), and the loss mask over completion positions (b, C)."""
    import torch

    length = max(len(s.prompt_ids) + len(s.completion_ids) for s in sequences)
    width = max(max(len(s.completion_ids) for s in sequences), 1)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    mask = torch.zeros((len(sequences), width))
    for row, (sample, count) in enumerate(zip(sequences, loss_tokens)):
        ids = sample.prompt_ids + sample.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        mask[row, :count] = 1.0
    starts = torch.tensor([len(s.prompt_ids) for s in sequences])
    return input_ids.to(device), attention.to(device), starts.to(device), mask.to(device)


def _stack(rows, mask):
    """Per-sequence 1-D log-prob tensors, right-padded to the mask's (b, C)."""
    import torch

    out = torch.zeros(mask.shape, device=mask.device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row.to(mask.device)
    return out


def _sequence_logprobs(model, sequences: list[Sample], cfg: GRPOConfig, pad_id: int, device) -> list:
    """Log-probs of each sequence's completion tokens under `model`, without gradients."""
    import torch

    result = []
    with torch.no_grad():
        for offset in range(0, len(sequences), cfg.micro_batch_size):
            micro = sequences[offset : offset + cfg.micro_batch_size]
            input_ids, attention, starts, mask = _collate(micro, [len(s.completion_ids) for s in micro], pad_id, device)
            logprobs, _ = _completion_logprobs(model, input_ids, attention, starts, mask.shape[1], cfg.temperature, with_entropy=False)
            result += [logprobs[i, : len(s.completion_ids)].float().cpu() for i, s in enumerate(micro)]
    return result


# ------------------------------------------------------------------------------------------------
# figures


def _rollout_metrics(rolled: list[Group], batch: list[Group]) -> dict[str, Any]:
    samples = [s for g in rolled for s in g.samples]
    known = [s.reward.total for s in samples if s.reward.total is not None]
    correct = [float(s.reward.correct) for s in samples if s.reward.correct is not None]
    mean = _mean(known)
    solved = [[s.reward.correct for s in g.samples if s.reward.correct is not None] for g in rolled]
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(_mean([(r - mean) ** 2 for r in known])) if known else None,
        "accuracy": _mean(correct),
        "format_rate": _mean([float(s.reward.formatted) for s in samples]),
        "completion_length": _mean([float(len(s.completion_ids)) for s in samples]),
        "truncation_rate": _mean([float(s.truncated) for s in samples]),
        "overlong_penalty": _mean([s.reward.overlong for s in samples]),
        "repetition_penalty": _mean([s.reward.repetition for s in samples]),
        "completions": len(samples),
        "groups": len(rolled),
        "groups_trained": len(batch),
        "groups_all_correct": sum(1 for g in solved if g and all(g)),
        "groups_all_wrong": sum(1 for g in solved if g and not any(g)),
        "unverifiable": sum(1 for s in samples if s.reward.reason in ("no_reference", "bad_reference")),
        "timeouts": sum(1 for s in samples if s.reward.reason == "timeout"),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------
# model I/O and log-probs
# TODO(issue-5): these stand-ins go once distill.students.{presets,checkpoint,parallel} and the
# shared chunked log-prob function land on main; GRPO must use those (one copy each).


def _prompt_ids(tokenizer, text: str) -> list[int]:
    # the rendered text already holds the template's special tokens (BOS included where it has one)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _load_student(cfg: GRPOConfig, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=dtype).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    return tokenizer, model


def _frozen_copy(model):
    import copy

    frozen = copy.deepcopy(model)
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    return frozen.eval()


def _completion_logprobs(model, input_ids, attention, starts, width: int, temperature: float, *, with_entropy: bool):
    """Log-probs (b, C) of the completion tokens (at the sampling temperature) and, if asked,
    the entropy (b, C) of the policy's next-token distribution at each of them."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float() / temperature  # (b, L-1, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    token_logprobs = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, L-1): log p(token t+1)
    index = ((starts - 1).unsqueeze(1) + torch.arange(width, device=input_ids.device)).clamp(max=logits.shape[1] - 1)  # (b, C)
    logprobs = token_logprobs.gather(1, index)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1).gather(1, index)  # (b, C)
    return logprobs, entropy


def _checkpoint_path(run_dir) -> Path:
    return run_dir.path / "checkpoint" / "state.pt"


def _save(run_dir, policy, optimizer, scheduler, step: int, cursor: int) -> None:
    import torch

    path = _checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": policy.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "cursor": cursor}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _resume(run_dir, policy, optimizer, scheduler) -> tuple[int, int]:
    import torch

    path = _checkpoint_path(run_dir)
    if not path.is_file():
        _drop_metrics_after(run_dir, 0)
        return 0, 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    policy.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _drop_metrics_after(run_dir, state["step"])
    return state["step"], state["cursor"]


def _drop_metrics_after(run_dir, step: int) -> None:
    """Steps logged after the checkpoint we resume from are redone: forget their lines."""
    import json

    path = run_dir.file("metrics.jsonl")
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _export(run_dir, policy, tokenizer) -> Path:
    out = run_dir.path / "model"
    model = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

"""Student SFT: `distill train --student qwen-7b --data accepted.parquet --out runs/qwen-7b`.

Under torchrun the same command trains on many GPUs or nodes:
`torchrun --nproc_per_node 8 -m distill.cli train --student qwen-7b --data ... --out ...`.

Reads conversations (a chat `messages` column, or `problem` + `completion`) and fine-tunes the
student on them; writes RUN_DIR/model (a Hugging Face directory: weights, config, tokenizer with
the chat template, generation config), RUN_DIR/checkpoints, config.yaml, metrics.jsonl (one line
per step) and metrics.json. The loop below is the whole algorithm; the choices it makes:

- Loss: token-level cross-entropy on assistant tokens only (students/data.py decides the mask),
  averaged over every trained token of the global batch: each micro-batch contributes its summed
  loss divided by the global token count, on every rank, so one step of 8 sequences and four
  accumulated steps of 2 give the same gradient (not a mean of per-micro-batch means, which
  over-weights short sequences).
- Logit distillation (off by default: kd_alpha=0): with the teacher's top-k log-probs kept by
  `distill generate top_logprobs=k`, loss = (1 - kd_alpha) * CE + kd_alpha * KD, where KD is the
  forward KL from the teacher's top-k (renormalised at kd_temperature T) to the student's
  full-vocabulary softmax at T, times T^2 (students/logprobs.py `topk_forward_kl`), averaged over
  the global batch's positions that have top-k as CE is over its trained tokens. The top-k are
  aligned to the re-tokenized conversation once, when the data is tokenized (students/data.py
  `align_topk`); a student whose tokenizer or template does not reproduce the teacher's ids is
  refused. With kd_alpha=0 none of this runs: the loss is the cross-entropy path above.
- Batch: `global_batch` sequences per optimizer step (open-r1's 128). Each rank packs its share
  into micro-batches of at most `micro_batch_tokens` tokens (padding-free), so the number of
  accumulation steps follows from the data rather than being set by hand.
- Data order: a fresh seeded shuffle per epoch; the step index is the data position, so a resumed
  run continues with the very next batch. The last batch of an epoch may be smaller.
- Optimiser: AdamW (fused on CUDA; 8-bit or paged 8-bit through bitsandbytes when asked), no
  weight decay, linear warmup then cosine decay to `min_lr_ratio` of the peak (open-r1's
  `cosine_with_min_lr`), gradient clipping by global norm. A step whose gradient norm is not
  finite is skipped (and logged), never applied.
- Precision: fp32 weights; bf16 compute on GPU (FSDP2 mixed precision or autocast); fp32 on CPU.
- Memory: logits are never materialised for a whole sequence (students/logprobs.py), optional
  activation checkpointing, CPU offload, LoRA/QLoRA (peft), all chosen by the preset's memory
  plan for the GPU count unless set explicitly; the plan is checked against device memory
  before any weight is loaded.
- Checkpoints every `save_every` steps and at the end (students/checkpoint.py): weights,
  optimiser, scheduler, data position and RNG; a rerun of the same command resumes.

- Data: tokenized once, by rank 0, into a memory-mapped cache (students/data.py `TokenizedData`,
  RUN_DIR/tokenized or `data_cache`) keyed by the data's fingerprint, tokenizer, template and
  max_seq_len; every rank, rerun and resume reads it. Weights: rank 0 reads them, the other ranks
  receive only their shards (students/parallel.py `load_sharded`); the memory check counts the
  host memory of a node (one full copy while loading) as well as the device's.

Simplifications: the cache is built by rank 0 alone while the others wait (the process group's
timeout, 60 minutes, bounds it); no sequence parallelism, so one sequence must fit on one device; no
evaluation during training (`distill eval` does that on the exported model).
"""

from __future__ import annotations

import difflib
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from distill.config import Loaded, load_config
from distill.errors import ConfigError, InputError, MissingDependency
from distill.students.presets import PRESETS, check_host_memory, check_memory, estimate_host_memory_gb, estimate_memory_gb, is_preset, preset_values


@dataclass(frozen=True)
class TrainConfig:
    student: str  # a preset (qwen-1.5b ... llama-70b), a hub id, or a local model directory
    data: str  # Parquet/JSONL file, `distill filter` run directory, or hub dataset name
    out: Path  # the run directory
    # conversation -> tokens
    chat_template: str = "auto"  # auto (the model's own) | chatml-think | chatml | llama3-think | llama3 | model | a .jinja file
    end_of_turn: Optional[str] = None  # token closing assistant turns (default: the template's, else eos)
    max_seq_len: Optional[int] = None  # default: the model's context, at most 32768
    too_long: Literal["drop", "truncate"] = "drop"  # sequences over max_seq_len
    on_bad_row: Literal["error", "skip"] = "error"  # rows with no assistant turn or malformed messages
    data_split: str = "train"  # for hub datasets
    data_cache: Optional[str] = None  # folder of tokenized caches (shared by runs on the same data); default RUN_DIR/tokenized
    # model
    rope_theta: Optional[float] = None  # raise the RoPE base (Qwen2.5-Math presets: 300000)
    max_position_embeddings: Optional[int] = None
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa_varlen (students/attention.py)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # compute dtype; auto: bf16 on GPU, fp32 on CPU
    # optimisation (defaults: open-r1's OpenR1-Distill-7B recipe)
    epochs: int = 5
    max_steps: Optional[int] = None  # stop (and shape the schedule) after this many steps
    global_batch: int = 128  # sequences per optimizer step, over all ranks and micro-batches
    lr: float = 4e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.2  # max global gradient norm; 0 = no clipping
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    seed: int = 42
    # batching and memory
    packing: bool = True
    micro_batch_tokens: Optional[int] = None  # token budget of a packed micro-batch; default max_seq_len
    micro_batch_size: int = 1  # sequences per micro-batch when packing=false
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    check_memory: bool = True  # refuse a plan whose estimated memory exceeds the device's, before loading
    loss_chunk_tokens: int = 1024  # positions per LM-head chunk in the chunked loss
    fused_loss: Literal["auto", "liger", "chunked"] = "auto"
    # logit distillation on the teacher's top-k (generate top_logprobs=k); docs/train.md says why these defaults
    kd_alpha: float = 0.0  # loss = (1 - kd_alpha) * CE + kd_alpha * KD; 0 = plain SFT (DistillKit uses 0.5)
    kd_temperature: float = 1.0  # T of the KD term (student and teacher softmax at T, scaled by T^2)
    # LoRA / QLoRA (peft)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    quantize: Literal["none", "4bit"] = "none"  # 4bit = QLoRA (bitsandbytes, GPU)
    merge_lora: bool = True  # export the base with the adapter merged in; false: the adapter alone
    # output
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2
    export_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: the dtype the base was stored in
    wandb_project: Optional[str] = None

    def __post_init__(self) -> None:
        positive = ("epochs", "global_batch", "micro_batch_size", "save_every", "keep_checkpoints", "loss_chunk_tokens", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_seq_len", "micro_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.lr <= 0 or self.grad_clip < 0:
            raise ValueError("lr must be positive and grad_clip non-negative")
        if self.quantize != "none" and not self.lora:
            raise ValueError("quantize=4bit is QLoRA: set lora=true too")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise ValueError(f"kd_alpha must be in [0, 1] and kd_temperature positive, got {self.kd_alpha} and {self.kd_temperature}")


# Settings that define a run's trajectory: a resumed run must keep them.
LOCKED = (
    "student", "data", "chat_template", "max_seq_len", "too_long", "epochs", "max_steps", "global_batch", "lr", "schedule",
    "warmup_ratio", "min_lr_ratio", "weight_decay", "seed", "lora", "lora_r", "lora_alpha", "lora_targets", "quantize",
    "kd_alpha", "kd_temperature",
)  # fmt: skip

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "B200": 2250e12, "L40S": 362e12}
_KILL_AT_STEP = "DISTILL_FAULT_SIGKILL_AT_STEP"  # test hook: kill -9 ourselves after this step


def load_train_config(recipe: str | Path | None = None, flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> Loaded[TrainConfig]:
    """The config from defaults < preset < recipe < flags < key=value. The preset (named by
    `student` in any layer) brings its memory plan for the number of GPUs of this launch."""
    first = load_config(TrainConfig, recipe=recipe, flags=flags, overrides=overrides)
    student = first.config.student
    if not is_preset(student):
        return first
    return load_config(TrainConfig, recipe=recipe, flags=flags, overrides=overrides, preset=preset_values(student, visible_gpus()), preset_name=student)


def visible_gpus() -> int:
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) if torch.cuda.is_available() else 0


def run(cfg: TrainConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    from distill.students.parallel import close_distributed, init_distributed

    dist = init_distributed(cfg.dtype)
    try:
        return _train(cfg, sources, dist)
    finally:
        if dist.distributed:
            close_distributed()


def _train(cfg: TrainConfig, sources: Mapping[str, str] | None, dist) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from distill.compute import train_block
    from distill.rundir import RunDir
    from distill.students.chat import apply_template, resolve_template
    from distill.students.checkpoint import Checkpointer, export_model
    from distill.students.data import collate, epoch_order, iter_conversations, plan_step
    from distill.students.logprobs import Scorer
    from distill.students.parallel import load_sharded, peak_memory_gb

    # ---- cheap checks first: the data is there and its first row is a conversation, before any
    # model is looked for (a missing file is reported as such, not as an unreachable hub) ------
    first_row = next(iter_conversations(cfg.data, cfg.data_split, cfg.on_bad_row, []), None)
    student_model_id(cfg.student)
    kd_on = cfg.kd_alpha > 0

    # ---- run directory (rank 0 writes; every rank reads the same inputs) --------------------
    run_dir, problem = None, None
    if dist.is_main:
        try:
            run_dir = RunDir(cfg.out, "train", cfg, sources, locked=LOCKED)
        except ConfigError as error:  # e.g. resumed with other settings: every rank must stop
            problem = str(error)
    problem = dist.broadcast(problem)
    if problem:
        raise ConfigError(problem)

    def say(message: str) -> None:
        if run_dir is not None:
            run_dir.say(message)

    if run_dir is not None:
        run_dir.announce(f"distill train: {student_name(cfg.student)} on {cfg.data} -> {cfg.out}, {processes(dist)}", shown=("student", "data", "out"))

    # ---- student, tokenizer and chat template ------------------------------------------------
    model_id, hf_config = resolve_student(cfg.student)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    template = resolve_template(cfg.chat_template, tokenizer, cfg.end_of_turn)
    max_len = cfg.max_seq_len or default_max_seq_len(hf_config)
    positions = cfg.max_position_embeddings or getattr(hf_config, "max_position_embeddings", None)
    if positions and max_len > positions:
        say(f"warning: max_seq_len {max_len} exceeds the model's {positions} positions; raise rope_theta and max_position_embeddings as the Qwen2.5-Math presets do")
    say(f"student {model_id}; chat template '{template.name}' (assistant turns end with {template.end_of_turn!r}); max {max_len} tokens")

    # ---- data: conversations -> token ids + loss mask -----------------------------------------
    dataset = _tokenized(cfg, tokenizer, template, max_len, dist, say)  # once, memory-mapped by every rank
    skipped = dataset.skipped_rows
    if not dataset.rows:
        raise InputError(f"{cfg.data}: no training rows{f' ({len(skipped)} skipped as malformed)' if skipped else ''}; check the file")
    for line in _data_report(dataset, max_len, cfg.too_long):
        say(line)
    if kd_on:
        _check_kd(cfg, dataset, model_id)
        say(f"logit distillation: kd_alpha {cfg.kd_alpha}, kd_temperature {cfg.kd_temperature}; "
            f"{dataset.kd_rows - dataset.kd_misaligned} of {dataset.rows} rows carry the teacher's top-k")
        if dataset.kd_misaligned and run_dir is not None and not run_dir.warn_dropped(
                "kd_misaligned", dataset.kd_misaligned, dataset.kd_rows, "rows trained on cross-entropy alone: their top-k ids are not in the student's tokenization",
                "these are sampled tokenizations that re-encoding the text does not reproduce; the first is " + dataset.kd_first_misaligned):  # fmt: skip
            say(f"{dataset.kd_misaligned} rows with top-k trained on cross-entropy alone (first: {dataset.kd_first_misaligned})")
    elif first_row is not None and first_row.topk is not None:
        say("note: the data carries the teacher's top-k log-probs; kd_alpha=0.5 would distil from them as well (docs/train.md)")
    read = dataset.rows + len(skipped)
    for reason, count, what, fix in _data_drops(dataset, max_len):
        if count and run_dir is not None and not run_dir.warn_dropped(reason, count, read, what, fix):
            say(f"{what}: {count:,} of {read:,}")
    if not dataset.examples:
        raise InputError(
            f"{cfg.data}: none of the {dataset.rows} rows is left to train on "
            f"({dataset.dropped_too_long} longer than max_seq_len={max_len}); raise max_seq_len or pass too_long=truncate"
        )
    examples = dataset.examples
    lengths = dataset.lengths.tolist()
    trained_counts = dataset.trained.tolist()
    kd_counts = dataset.kd_counts.tolist() if kd_on else [0] * len(lengths)  # positions with the teacher's top-k
    micro_tokens = cfg.micro_batch_tokens or max_len
    if cfg.packing and max(lengths) > micro_tokens:
        raise ConfigError(f"micro_batch_tokens={micro_tokens} is smaller than the longest sequence ({max(lengths)} tokens); raise it to at least max_seq_len={max_len}")
    steps_per_epoch = math.ceil(len(examples) / cfg.global_batch)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    say(f"{len(examples)} sequences, {steps_per_epoch} steps per epoch of {min(cfg.global_batch, len(examples))} sequences, {total_steps} steps")

    checkpointer = Checkpointer(Path(cfg.out) / "checkpoints", dist, cfg.keep_checkpoints)
    model_dir = Path(cfg.out) / "model"
    latest = checkpointer.latest()
    finished = latest is not None and checkpointer.state(latest)["step"] >= total_steps
    if finished and any((model_dir / name).is_file() for name in ("config.json", "adapter_config.json")) and (Path(cfg.out) / "metrics.json").is_file():
        say(f"already trained ({total_steps} steps) and exported to {model_dir}; nothing to do")
        from distill.rundir import read_metrics

        return read_metrics(cfg.out)

    # ---- memory plan, checked before any weight is loaded ---------------------------------------
    if cfg.check_memory:
        _check_memory(cfg, hf_config, dist, micro_tokens if cfg.packing else max_len * cfg.micro_batch_size)

    # ---- model, optimiser, schedule --------------------------------------------------------------
    scorer = load_sharded(
        lambda meta: load_student(model_id, hf_config, cfg, dist, meta=meta), lambda lm: Scorer(lm, cfg.loss_chunk_tokens, cfg.fused_loss), dist, cfg.cpu_offload
    )  # fmt: skip
    model = scorer.model
    parameters = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, parameters, dist.device)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio))
    counts = _parameter_counts(model)
    say(f"parameters: {counts['total']:,}, trained {counts['trainable']:,}{' (LoRA)' if cfg.lora else ''}")

    fingerprint = {"sequences": len(examples), "tokens": int(sum(lengths)), "trained_tokens": int(sum(trained_counts))}
    start_step, last_loss = 0, None
    if latest is not None:
        state = checkpointer.load(latest, scorer, optimizer, scheduler)
        if state.get("data") != fingerprint:
            raise ConfigError(f"{cfg.out}: the data changed since checkpoint {latest.name} ({state.get('data')} -> {fingerprint}); use a new --out")
        start_step, last_loss = int(state["step"]), state.get("loss")
        say(f"resuming from {latest.name}: step {start_step} of {total_steps}")
        if run_dir is not None:
            run_dir.mark_resume(start_step)
    wandb = _wandb(cfg, dist) if cfg.wandb_project else None

    # ---- the loop ----------------------------------------------------------------------------
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    peak_flops = _peak_flops(dist.device)
    kill_at = int(os.environ.get(_KILL_AT_STEP, "0"))
    scorer.train()
    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not dist.is_main)
    history: list[float] = []
    kd_history: list[float] = []
    tokens_per_s: list[float] = []
    for step in range(start_step, total_steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_order(len(examples), cfg.seed, epoch)
        chosen = order[position * cfg.global_batch : (position + 1) * cfg.global_batch].tolist()
        plan = plan_step(lengths, chosen, dist.world, cfg.packing, micro_tokens, cfg.micro_batch_size)
        global_trained = sum(trained_counts[i] for i in chosen)  # the same number on every rank
        global_kd = sum(kd_counts[i] for i in chosen)

        local_nll = torch.zeros((), dtype=torch.float64, device=dist.device)
        local_kd = torch.zeros((), dtype=torch.float64, device=dist.device)
        local = [0, 0, 0]  # tokens, padding, sum of squared sequence lengths (attention FLOPs)
        for micro in plan[dist.rank]:
            batch = collate([examples[i] for i in micro], cfg.packing, pad_id)
            mask = batch.attention_mask.to(dist.device) if batch.attention_mask is not None else None
            if kd_on and batch.kd is not None:
                # Logit distillation: (1 - a) * mean CE + a * mean KD, each over the global batch.
                weights = ((1 - cfg.kd_alpha) * dist.world / global_trained, cfg.kd_alpha * dist.world / global_kd)
                with dist.autocast():
                    loss_kd, nll, kd = scorer(batch.input_ids.to(dist.device), batch.position_ids.to(dist.device), batch.targets.to(dist.device), mask,
                                              reduction="sum", kd=batch.kd.to(dist.device), kd_temperature=cfg.kd_temperature, kd_weights=weights)  # fmt: skip
                loss_kd.backward()
                local_kd += kd.double()
            else:
                with dist.autocast():
                    nll = scorer(batch.input_ids.to(dist.device), batch.position_ids.to(dist.device), batch.targets.to(dist.device), mask, reduction="sum")
                # This micro-batch's share of the mean over the global batch's trained tokens; FSDP
                # averages gradients over ranks, so the world size turns that average into a sum.
                (nll * ((1 - cfg.kd_alpha if kd_on else 1) * dist.world / global_trained)).backward()
            local_nll += nll.detach().double()
            local = [local[0] + batch.tokens, local[1] + batch.padded, local[2] + batch.attention_pairs]

        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = scheduler.get_last_lr()[0]
        skipped_step = not math.isfinite(grad_norm)
        if not skipped_step:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        nll_sum, kd_sum, tokens, padded, pairs = dist.sum([float(local_nll), float(local_kd), *local])
        seconds = time.perf_counter() - started
        loss = nll_sum / global_trained
        rate = tokens / seconds
        flops = counts["flops_per_token"] * tokens + 6 * counts["layers"] * counts["hidden"] * pairs
        record = {
            "step": step + 1,
            "epoch": epoch + (position + 1) / steps_per_epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "trained_tokens": global_trained,
            "padding_fraction": padded / max(1.0, tokens + padded),
            "micro_batches": len(plan[0]),
            "tokens_per_s": rate,
            "mfu": flops / seconds / (peak_flops * dist.world) if peak_flops else None,
            "peak_memory_gb": dist.max(peak_memory_gb(dist.device)),
            "step_time_s": seconds,
            "cpu_time_s": time.process_time() - cpu_started,  # this process, all threads: wall >> cpu means waiting
        }
        if kd_on:
            record["kd_loss"] = kd_sum / global_kd if global_kd else None  # mean top-k forward KL (times T^2)
            record["kd_tokens"] = global_kd
            if global_kd:
                kd_history.append(record["kd_loss"])
        if skipped_step:
            record["skipped"] = "non-finite gradient norm"
            say(f"step {step + 1}: gradient norm is {grad_norm}; the update was skipped")
        if run_dir is not None:
            run_dir.log_metrics(record)
        if wandb is not None:
            wandb.log(record, step=step + 1)
        history.append(loss)
        tokens_per_s.append(rate)
        last_loss = loss
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        progress.update(1)

        done = step + 1
        if done % cfg.save_every == 0 or done == total_steps:
            state = {"epoch": epoch, "position": position + 1, "loss": loss, "data": fingerprint}
            checkpointer.save(done, scorer, optimizer, scheduler, state)
        if kill_at and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()

    # ---- export ------------------------------------------------------------------------------
    apply_template(tokenizer, template)
    export_model(
        model,
        tokenizer,
        model_dir,
        dist,
        merge_lora=cfg.merge_lora,
        dtype=export_dtype(cfg, hf_config),
        generation_config=generation_config(tokenizer, template, hf_config),
    )
    metrics = {
        "student": cfg.student,
        "model_id": model_id,
        "model_dir": str(model_dir),
        "steps": total_steps,
        "resumed_from_step": start_step or None,
        "first_loss": history[0] if history else None,
        "final_loss": last_loss,
        "sequences": len(examples),
        "rows": dataset.rows,
        "dropped_too_long": dataset.dropped_too_long,
        "truncated": dataset.truncated,
        "skipped_rows": len(dataset.skipped_rows),
        "trained_tokens_per_epoch": int(sum(trained_counts)),
        # Over every session of a resumed run (metrics.jsonl): what `distill compare` shows as cost.
        "train_tokens": run_dir.step_total("trained_tokens") if run_dir is not None else None,
        "tokens_per_s_mean": sum(tokens_per_s) / len(tokens_per_s) if tokens_per_s else None,
        "world_size": dist.world,
        "chat_template": template.name,
    }
    if kd_on:
        metrics["kd"] = {
            "alpha": cfg.kd_alpha,
            "temperature": cfg.kd_temperature,
            "first_kd_loss": kd_history[0] if kd_history else None,  # this session's first and last step with top-k
            "final_kd_loss": kd_history[-1] if kd_history else None,
            "rows_with_topk": dataset.kd_rows - dataset.kd_misaligned,
            "rows_misaligned": dataset.kd_misaligned,
            "kd_tokens_per_epoch": int(sum(kd_counts)),
        }
    if run_dir is not None:
        metrics["compute"] = train_block(run_dir, model)  # the ledger; the data's teacher cost is its lineage's
        run_dir.write_metrics(metrics)
        losses = f"loss {_loss(metrics['first_loss'])} -> {_loss(last_loss)}" if history else f"loss {_loss(last_loss)}"
        say(f"done: {total_steps} steps, {losses}, {metrics['train_tokens'] or 0:,.0f} tokens trained, "
            f"{time.time() - run_dir.started:.0f}s; model in {model_dir}")
    if wandb is not None:
        wandb.finish()
    return metrics


# --------------------------------------------------------------------------------------------
# the pieces the loop calls


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def student_name(student: str) -> str:
    """'qwen-7b (Qwen/Qwen2.5-Math-7B)' for a preset, else the model as given."""
    return f"{student} ({PRESETS[student]['model']})" if is_preset(student) else student


def processes(dist) -> str:
    """'1 process on cpu', '8 processes on cuda (NVIDIA H100 80GB HBM3)'."""
    where = dist.device.type
    if where == "cuda":
        import torch

        where += f" ({torch.cuda.get_device_name(dist.device)})"
    return f"{dist.world} process{'es' if dist.world > 1 else ''} on {where}"


def student_model_id(student: str) -> str:
    """The model a student names (a preset's base, a directory, a hub id), checked without asking
    the hub: a path must be a model directory, anything else a preset or spelled org/name."""
    model_id = PRESETS[student]["model"] if is_preset(student) else student
    path = Path(model_id)
    if path.exists() and not (path / "config.json").is_file():
        raise InputError(f"{student}: a path without config.json, so not a model directory; pass a model directory, a hub id, or a preset ({', '.join(PRESETS)})")
    if not path.exists() and not is_preset(student) and model_id.count("/") != 1:
        close = difflib.get_close_matches(student, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"student '{student}' is not a preset ({', '.join(PRESETS)}){hint}, an existing model directory, or a hub id (org/name)")
    return model_id


def resolve_student(student: str):
    """(model id or path, its transformers config); one clear error naming the true cause when
    the student is none of a preset, a local model directory, or a hub model that can be had
    (not cached and the hub unreachable, gated, no such repository: distill.hub)."""
    from transformers import AutoConfig

    from distill.hub import model_error

    model_id = student_model_id(student)
    try:
        return model_id, AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        what = f"student '{student}' (preset: {model_id})" if is_preset(student) else f"student '{student}'"
        raise model_error(model_id, error, what, gated=is_preset(student) and PRESETS[student].get("gated", False)) from None


def default_max_seq_len(hf_config) -> int:
    """max_seq_len when neither preset nor user sets one: the model's context, at most 32768
    (also what `distill filter --student` checks lengths against)."""
    return min(getattr(hf_config, "max_position_embeddings", 32768) or 32768, 32768)


def load_student(model_id: str, hf_config, cfg: TrainConfig, dist, meta: bool = False):
    """The causal LM with the run's RoPE, attention, precision, checkpointing and LoRA settings.
    meta=True: the same modules on the meta device, no weights read (parallel.load_sharded fills
    each rank's shards from rank 0's copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.students.attention import resolve_attention

    if cfg.rope_theta:
        parameters = getattr(hf_config, "rope_parameters", None)
        if isinstance(parameters, dict):
            hf_config.rope_parameters = {**parameters, "rope_theta": cfg.rope_theta}
        else:  # transformers 4.x
            hf_config.rope_theta = cfg.rope_theta
    if cfg.max_position_embeddings:
        hf_config.max_position_embeddings = cfg.max_position_embeddings
    hf_config.use_cache = False
    kwargs: dict[str, Any] = {"config": hf_config, "attn_implementation": resolve_attention(cfg.attn_implementation, dist.device), "dtype": torch.float32}
    if cfg.lora and dist.device.type == "cuda":
        kwargs["dtype"] = torch.bfloat16  # a frozen base needs no fp32 master copy
    if cfg.quantize == "4bit":
        if dist.distributed:
            raise ConfigError("quantize=4bit (QLoRA) runs in one process: bitsandbytes' 4-bit weights are not sharded; launch without torchrun, or lora=true alone")
        if dist.device.type != "cuda":
            raise ConfigError("quantize=4bit (QLoRA) needs a CUDA GPU; use lora=true alone on CPU")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MissingDependency("bitsandbytes", "gpu", "QLoRA (quantize=4bit)") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": dist.device.index or 0}
    torch.manual_seed(cfg.seed)  # LoRA initialisation is random: seed it
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=kwargs["attn_implementation"], dtype=kwargs["dtype"])
    else:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    if cfg.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets: Any = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM"))
    return model


def build_optimizer(cfg: TrainConfig, parameters, device):
    import torch

    settings = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, fused=device.type == "cuda", **settings)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MissingDependency("bitsandbytes", "gpu", f"optimizer={cfg.optimizer}") from None
    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return kind(parameters, **settings)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup over `warmup` steps (the first
    step already moves), then constant, linear or cosine decay to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup - 1)
    progress = min(1.0, progress)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def generation_config(tokenizer, template, hf_config):
    """Stop at the end of turn (and the base's own eos); DeepSeek-R1's recommended sampling for
    its distilled models: temperature 0.6, top-p 0.95."""
    from transformers import GenerationConfig

    stop = [tokenizer.convert_tokens_to_ids(template.end_of_turn)]
    base_eos = hf_config.eos_token_id if isinstance(hf_config.eos_token_id, list) else [hf_config.eos_token_id]
    stop += [e for e in base_eos if e is not None and e not in stop]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop, pad_token_id=pad, do_sample=True, temperature=0.6, top_p=0.95)


def _parameter_counts(model) -> dict[str, int]:
    """Parameter counts and model FLOPs per token: 2N forward, 2N backward through activations,
    2N_trained backward into weights (6N for full fine-tuning; less for LoRA). The embedding
    lookup costs no matmul; a tied LM head does."""
    from distill.compute import module_params
    from distill.students.logprobs import causal_lm

    config = causal_lm(model).config
    counts = module_params(model)  # N as the compute ledger counts it: one convention
    compute, trainable = counts["params"], counts["trainable"]
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": trainable,
        "flops_per_token": 4 * compute + 2 * min(trainable, compute),
        "layers": int(config.num_hidden_layers),
        "hidden": int(config.hidden_size),
    }


def _peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _check_memory(cfg: TrainConfig, hf_config, dist, tokens: int) -> None:
    hidden = int(getattr(hf_config, "hidden_size", 0) or 0)
    layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    if not hidden or not layers:
        return  # an architecture we cannot size; let the allocator speak
    intermediate = int(getattr(hf_config, "intermediate_size", 4 * hidden) or 4 * hidden)
    vocab = int(getattr(hf_config, "vocab_size", 0) or 0)
    if is_preset(cfg.student):
        params = PRESETS[cfg.student]["params_b"] * 1e9
    else:
        params = vocab * hidden * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2) + layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    estimate = estimate_memory_gb(
        params, dist.world, lora=cfg.lora, quantize=cfg.quantize, cpu_offload=cfg.cpu_offload,
        activation_checkpointing=cfg.activation_checkpointing, tokens=tokens, hidden=hidden, layers=layers,
        intermediate=intermediate, vocab=vocab, chunk_tokens=cfg.loss_chunk_tokens,
    )  # fmt: skip
    if dist.device.type == "cuda":
        import torch

        available = -dist.max(-torch.cuda.mem_get_info(dist.device)[1] / 2**30)
        where = torch.cuda.get_device_name(dist.device)
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
        available = -dist.max(-psutil.virtual_memory().available / 2**30 / local)  # the least any rank sees: all decide alike
        where = "this machine's CPU memory" + (f" shared by {local} processes" if local > 1 else "")
    plan = "LoRA" if cfg.lora else "full fine-tuning"
    plan += f"{' 4-bit' if cfg.quantize == '4bit' else ''}, {dist.world} device{'s' if dist.world > 1 else ''}"
    plan += f"{', activation checkpointing' if cfg.activation_checkpointing else ''}{', CPU offload' if cfg.cpu_offload else ''}, {tokens} tokens per micro-batch"
    check_memory(estimate, available, where, plan)
    # Host memory, per node: the one full copy loading holds (parallel.load_sharded) and what each
    # process keeps in host memory (everything on CPU; the offloaded states with cpu_offload).
    import psutil

    on_gpu = dist.device.type == "cuda"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    load_bytes = 0.55 if cfg.quantize == "4bit" else (2 if cfg.lora and on_gpu else 4)  # load_student's dtype
    offloaded = estimate_memory_gb(
        params, dist.world, lora=cfg.lora, quantize=cfg.quantize, cpu_offload=False, activation_checkpointing=cfg.activation_checkpointing,
        tokens=tokens, hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, chunk_tokens=cfg.loss_chunk_tokens,
    )["states"]  # fmt: skip
    host = estimate_host_memory_gb(
        params, dist.world, local, load_bytes=load_bytes, device_states_gb=offloaded if on_gpu else estimate["total"], on_gpu=on_gpu, cpu_offload=cfg.cpu_offload
    )  # fmt: skip
    check_host_memory(host, -dist.max(-psutil.virtual_memory().available / 2**30), local)


def export_dtype(cfg: TrainConfig, hf_config):
    import torch

    if cfg.export_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.export_dtype == "float32":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _tokenized(cfg: TrainConfig, tokenizer, template, max_len: int, dist, say):
    """The training data, tokenized once: rank 0 writes the cache unless a launch before it did
    (a resume, a rerun, another run with the same data_cache), and every rank memory-maps the same
    files. The cache is keyed by the data's fingerprint, the tokenizer, the template, max_seq_len
    and the row settings, so any change to those tokenizes again into a new folder."""
    from distill.students.data import TokenizedData, cache_key, data_fingerprint, iter_conversations, tokenize_to_cache, tokenizer_fingerprint

    folder, problem = None, None
    if dist.is_main:
        try:
            key = cache_key({
                "data": data_fingerprint(cfg.data, cfg.data_split), "tokenizer": tokenizer_fingerprint(tokenizer),
                "template": [template.source, template.end_of_turn], "max_seq_len": max_len, "too_long": cfg.too_long, "on_bad_row": cfg.on_bad_row,
                **({"kd": True} if cfg.kd_alpha > 0 else {}),  # the teacher's top-k aligned (a cache without kd keeps its key)
            })  # fmt: skip
            folder = Path(cfg.data_cache or Path(cfg.out) / "tokenized") / key
            if (folder / "meta.json").is_file():
                say(f"tokenized data: {folder} (built by an earlier launch: not tokenized again)")
            else:
                skipped: list[str] = []
                tokenize_to_cache(iter_conversations(cfg.data, cfg.data_split, cfg.on_bad_row, skipped), tokenizer, template, max_len, cfg.too_long, folder, skipped,
                                  kd=cfg.kd_alpha > 0)  # fmt: skip
                say(f"tokenized data: {folder}")
        except (InputError, ConfigError) as error:  # every rank must stop, not wait for the cache
            problem = (isinstance(error, InputError), str(error))
    folder, problem = dist.broadcast((folder, problem))
    if problem:
        raise (InputError if problem[0] else ConfigError)(problem[1])
    return TokenizedData(folder)


def _check_kd(cfg: TrainConfig, dataset, model_id: str) -> None:
    """Refuse logit distillation without top-k to distil from, or with a student that does not
    tokenize the teacher's completions as the teacher did."""
    from distill.students.data import kd_refusal

    if not dataset.kd_rows:
        raise InputError(f"{cfg.data}: kd_alpha={cfg.kd_alpha} but no row carries the teacher's top-k log-probs ('top_logprobs'); "
                         "generate with top_logprobs=20 (then filter), or train with kd_alpha=0")
    refusal = kd_refusal(dataset, model_id)
    if refusal:
        raise InputError(refusal)


def _data_report(dataset, max_len: int, too_long: str) -> list[str]:
    lines = [f"data: {dataset.rows} rows -> {len(dataset.examples)} sequences, {dataset.tokens:,} tokens, {dataset.trained_tokens:,} trained"]
    if dataset.skipped_rows:
        lines.append(f"first malformed row skipped: {dataset.skipped_rows[0]}")
    notes = dataset.notes
    if notes.prefill_missing:
        lines.append(
            f"note: {notes.prefill_missing} assistant turns do not open with the template's generation prefill {notes.prefill!r}; "
            "they are trained as written, but at inference the prefill is given"
        )
    return lines


def _data_drops(dataset, max_len: int) -> list[tuple[str, int, str, str]]:
    """(reason, count, what, the setting to change) of each way rows were lost or cut."""
    return [
        ("malformed", len(dataset.skipped_rows), "rows skipped as malformed (on_bad_row=skip)", "fix those rows (the first is named above); on_bad_row=error stops at the first"),
        ("too_long", dataset.dropped_too_long, f"sequences dropped, longer than max_seq_len={max_len} (too_long=drop)", "raise max_seq_len, or too_long=truncate keeps their start"),
        ("truncated", dataset.truncated, f"sequences truncated to max_seq_len={max_len} (too_long=truncate): their ends, end-of-turn included, are not trained", "raise max_seq_len"),
        ("untrained", dataset.dropped_untrained, "sequences dropped with no trained token left after truncation", "raise max_seq_len"),
    ]


def _wandb(cfg: TrainConfig, dist):
    if not dist.is_main:
        return None
    try:
        import wandb
    except ImportError:
        raise MissingDependency("wandb", "wandb", "wandb_project=") from None
    from distill.config import to_dict

    wandb.init(project=cfg.wandb_project, config=to_dict(cfg), dir=str(cfg.out))
    return wandb

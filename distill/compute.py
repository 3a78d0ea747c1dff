"""The compute ledger: tokens each stage ran through which model, and the FLOPs they cost.

Every stage puts the same `compute` block into its metrics.json (built here, nowhere else), and
`distill compare` adds up the blocks of the runs a model came from (compare.lineage) to place it
on an accuracy-against-compute plot. The block:

    teacher_params, student_params        N of each model (see "N" below); None: not known
    student_trainable_params              parameters with gradients (LoRA: the adapter)
    teacher_prompt_tokens                 prompt tokens the teacher prefilled to sample
    teacher_tokens_generated              tokens the teacher sampled
    teacher_tokens_scored                 tokens a teacher forward pass scored (no sampling)
    student_prompt_tokens                 prompt tokens the student prefilled to sample
    student_tokens_generated              tokens the student sampled
    student_tokens_trained                tokens with a loss (what `train_tokens` counts)
    student_tokens_forward_backward       every token through a training forward + backward
                                          (prompts and user turns included: the backward runs
                                          through them too)
    student_tokens_no_grad                tokens through extra no-grad passes (grpo's old-policy
                                          and reference log-probs)
    flops                                 per part: teacher_generation, teacher_scoring,
                                          student_generation, student_training, student_no_grad
    flops_total                           their sum; None when a part has tokens but its model
                                          has no known N (never a silent under-count)
    counts_as                             "training" (part of the cost of making a model),
                                          "inference" (eval: reported apart), or "none" (filter)

Conventions (docs/architecture.md, "The compute ledger"):
- N is every parameter except the input embedding table: looking a token up is not a matmul.
  The output projection (LM head) counts, tied to the embedding or not, since every position
  multiplies by it. Kaplan et al. (2020) count non-embedding parameters and leave the LM head
  out too; that is negligible at their scale but not at ours (Qwen2.5-1.5B: its 233M-parameter
  head is 15% of N; the toy models: most of it). distill train's MFU uses the same N.
- Mixture of experts: N counts the experts active per token (each expert tensor times
  num_experts_per_tok / number of experts), read from the weights and config.json.
- A forward pass costs 2N FLOPs per token it processes: sampled tokens, prompt tokens prefilled
  (once per sample, as the records count them), tokens scored.
- A training pass costs 2N forward + 2N backward through the activations + 2N_trainable into
  the weights per token: 6N with full fine-tuning, less under LoRA.
- What it leaves out (an estimate, not a measurement): attention's own FLOPs (quadratic in
  length), padding, the savings of prefix caching across a prompt's n samples, logits computed
  only where needed, recomputation under activation checkpointing, and 4-bit (QLoRA) weights,
  which count at their packed size.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Mapping

LEDGER_VERSION = 1
TOKEN_KEYS = (
    "teacher_prompt_tokens", "teacher_tokens_generated", "teacher_tokens_scored", "student_prompt_tokens",
    "student_tokens_generated", "student_tokens_trained", "student_tokens_forward_backward", "student_tokens_no_grad",
)  # fmt: skip
TOKEN_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings)\.weight$")  # lookups: not in N
POSITION_EMBEDDING = re.compile(r"(^|\.)(wpe|position_embeddings|embed_positions)\.weight$")
MOE_EXPERTS = ("n_routed_experts", "num_experts", "num_local_experts")  # DeepSeek, Qwen-MoE, Mixtral


# --------------------------------------------------------------------------------------------
# the arithmetic


def block(
    counts_as: str,
    *,
    teacher_params: float | None = None,
    student_params: float | None = None,
    student_trainable_params: float | None = None,
    **tokens: float,
) -> dict[str, Any]:
    """The `compute` block from token counts (TOKEN_KEYS; missing ones are 0) and the models' N."""
    unknown = set(tokens) - set(TOKEN_KEYS)
    assert not unknown, f"not ledger token counts: {sorted(unknown)}"
    t = {key: int(tokens.get(key) or 0) for key in TOKEN_KEYS}
    trainable = student_params if student_trainable_params is None else min(student_trainable_params, student_params or 0)
    training = None if student_params is None else 4 * student_params + 2 * trainable

    def cost(flops_per_token: float | None, count: int) -> float | None:
        if count == 0:
            return 0.0
        return None if flops_per_token is None else float(flops_per_token) * count

    forward_teacher = None if teacher_params is None else 2 * teacher_params
    forward_student = None if student_params is None else 2 * student_params
    flops = {
        "teacher_generation": cost(forward_teacher, t["teacher_prompt_tokens"] + t["teacher_tokens_generated"]),
        "teacher_scoring": cost(forward_teacher, t["teacher_tokens_scored"]),
        "student_generation": cost(forward_student, t["student_prompt_tokens"] + t["student_tokens_generated"]),
        "student_training": cost(training, t["student_tokens_forward_backward"]),
        "student_no_grad": cost(forward_student, t["student_tokens_no_grad"]),
    }
    total = None if any(v is None for v in flops.values()) else sum(flops.values())
    return {
        "ledger": LEDGER_VERSION,
        "counts_as": counts_as,
        "teacher_params": _int(teacher_params),
        "student_params": _int(student_params),
        "student_trainable_params": _int(student_trainable_params if student_trainable_params is not None else student_params),
        **t,
        "flops": flops,
        "flops_total": total,
    }


def training_flops(ledger: Mapping[str, Any] | None) -> float | None:
    """What a run's block adds to the cost of making a model: its FLOPs if it counts as
    training, 0 for a filter, None when unknown. Eval (inference) adds nothing."""
    if not ledger:
        return None
    if ledger.get("counts_as") != "training":
        return 0.0
    return ledger.get("flops_total")


def human(flops: float | None) -> str:
    """3.1e15, 0 for none, "-" for unknown."""
    if flops is None:
        return "-"
    if flops == 0:
        return "0"
    mantissa, exponent = f"{flops:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


# --------------------------------------------------------------------------------------------
# N: from a loaded model, or from the weights files of a model directory / hub cache


def module_params(model) -> dict[str, int]:
    """N (see the module docstring) and the trainable parameter count of a loaded model (a
    transformers causal LM, under peft or a Scorer too). Under FSDP2 numel() is the whole
    parameter's, not the shard's."""
    from distill.students.logprobs import causal_lm

    lm = causal_lm(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    # the tied matrix is counted once in `total`; it is the LM head's matmul, so it stays
    return {"params": total if tied else total - embedding.numel(), "trainable": trainable}


def weights_params(model: str | Path | None) -> int | None:
    """N of a model from its safetensors headers (no weights are read) and config.json: a local
    directory, or a hub id already in the local cache (never downloaded). None when neither is
    on this machine, or the weights are not safetensors."""
    directory = _model_dir(model)
    if directory is None:
        return None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    adapter = _json(directory / "adapter_config.json")
    if adapter:  # a LoRA adapter kept apart (merge_lora=false): its base runs too
        base = weights_params(adapter.get("base_model_name_or_path"))
        return None if base is None else base + sum(math.prod(shape) for f in files for shape in _safetensors_shapes(f).values())
    config = _json(directory / "config.json")
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    layers = config.get("num_hidden_layers")
    experts = next((config[key] for key in MOE_EXPERTS if isinstance(config.get(key), int) and config[key] > 0), None)
    active = config.get("num_experts_per_tok")
    shapes: dict[str, list[int]] = {}
    for path in files:
        shapes.update(_safetensors_shapes(path))
    total = 0.0
    embedding = head = 0
    for name, shape in shapes.items():
        count = math.prod(shape)
        layer = re.search(r"\blayers\.(\d+)\.", name)
        if layer and isinstance(layers, int) and int(layer.group(1)) >= layers:
            continue  # DeepSeek-V3's multi-token-prediction layer: not used to sample
        if TOKEN_EMBEDDING.search(name):
            embedding = max(embedding, count)
            continue
        if POSITION_EMBEDDING.search(name):
            continue
        if name.endswith("lm_head.weight"):
            head = count
        if experts and active and ".experts." in name:
            count = count * active / experts  # only num_experts_per_tok of them run per token
        total += count
    if not head:  # tied: the embedding matrix is the LM head
        total += embedding
    return int(total)


def _model_dir(model: str | Path | None) -> Path | None:
    if not model:
        return None
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).count("/") != 1:  # a file, or not an owner/name hub id
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not in the cache: unknown, and never fetched for a ledger
        return None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    return {name: list(spec.get("shape", [])) for name, spec in header.items() if name != "__metadata__" and isinstance(spec, dict)}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------
# the stages' blocks


def rl_step(rolled, batch, cfg, dist) -> dict[str, int]:
    """The token counts of one grpo (or onpolicy) step, over all ranks, for its step record.
    Rollouts: every completion of every prompt rolled out (dynamic sampling's refills too).
    Update: the sequences grpo._optimise trains (a known reward, or a teacher's per-token
    advantages), prompt included, once per epoch (mu). No-grad passes over them, as _optimise
    makes them: old-policy log-probs when a step has more than one optimizer step or a teacher
    hook computed them (onpolicy's `sampling_logprobs`), reference log-probs when beta > 0."""
    samples = [s for group in rolled for s in group.samples]
    sequences = [s for group in batch for s in group.samples if s.reward.total is not None or getattr(s, "token_advantages", None) is not None]
    prompt, generated, update, count, hooked = dist.sum([
        float(sum(len(s.prompt_ids) for s in samples)), float(sum(len(s.completion_ids) for s in samples)),
        float(sum(len(s.prompt_ids) + len(s.completion_ids) for s in sequences)), float(len(sequences)),
        float(any(getattr(s, "sampling_logprobs", None) is not None for s in sequences)),
    ])  # fmt: skip
    mu, minibatches, beta = getattr(cfg, "mu", 1), getattr(cfg, "minibatches", 1), getattr(cfg, "beta", 0.0)
    passes = int(mu * min(minibatches, count) > 1 or hooked > 0) + int(beta > 0)
    return {"prompt_tokens": int(prompt), "generated_tokens": int(generated), "forward_backward_tokens": int(mu * update),
            "no_grad_tokens": int(passes * update)}  # fmt: skip


def rl_block(run_dir, cfg, model, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """grpo's block (and onpolicy's, which shares its loop) from the step records of every
    session (rundir.step_rows). A step record's `teacher_scored_tokens` (onpolicy: the sampled
    tokens the teacher scored) is the teacher's forward, together with the prompts ahead of them
    (the step's `prompt_tokens`: onpolicy scores every rolled-out sample); the teacher's N is
    the metrics' `teacher_params`, else read from the weights cfg.teacher names."""
    rows = run_dir.step_rows()
    counts = module_params(model)
    scored = sum((row.get("teacher_scored_tokens") or 0) + (row.get("prompt_tokens", 0) if row.get("teacher_scored_tokens") else 0) for row in rows)
    teacher = (metrics or {}).get("teacher_params")
    if teacher is None and scored:
        teacher = weights_params(getattr(cfg, "teacher", None))
    return block(
        "training", teacher_params=teacher, student_params=counts["params"], student_trainable_params=counts["trainable"],
        teacher_tokens_scored=scored,
        student_prompt_tokens=sum(row.get("prompt_tokens", 0) for row in rows),
        student_tokens_generated=sum(_generated(row) for row in rows),
        student_tokens_trained=sum(row.get("trained_tokens", 0) for row in rows),
        student_tokens_forward_backward=sum(row.get("forward_backward_tokens", row.get("trained_tokens", 0)) for row in rows),
        student_tokens_no_grad=sum(row.get("no_grad_tokens", 0) for row in rows),
    )  # fmt: skip


def _generated(row: Mapping[str, Any]) -> int:
    if "generated_tokens" in row:
        return int(row["generated_tokens"])
    return round((row.get("completion_length") or 0) * (row.get("completions") or 0))  # records from before the ledger


def train_block(run_dir, model) -> dict[str, Any]:
    """distill train's block: every step's tokens (all of each sequence) went through a forward
    and a backward; its data's teacher cost is its lineage's (compare), not counted here."""
    counts = module_params(model)
    rows = run_dir.step_rows()
    return block(
        "training", student_params=counts["params"], student_trainable_params=counts["trainable"],
        student_tokens_trained=sum(row.get("trained_tokens", 0) for row in rows),
        student_tokens_forward_backward=sum(row.get("tokens", row.get("trained_tokens", 0)) for row in rows),
    )  # fmt: skip


def generate_block(model: str, prompt_tokens: int, completion_tokens: int, params: float | None = None) -> dict[str, Any]:
    """distill generate's block: the teacher prefilled and sampled; N given or read from its weights."""
    teacher = params if params is not None else weights_params(model)
    return block("training", teacher_params=teacher, teacher_prompt_tokens=prompt_tokens, teacher_tokens_generated=completion_tokens)


def eval_block(model: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """distill eval's block: inference, reported apart from what making the model cost."""
    return block("inference", student_params=weights_params(model), student_prompt_tokens=prompt_tokens, student_tokens_generated=completion_tokens)


def filter_block(inputs) -> dict[str, Any]:
    """distill filter runs no model: an empty block naming its input, whose ledger is the cost
    (compare follows it)."""
    return {**block("none"), "upstream": [str(p) for p in inputs]}


# --------------------------------------------------------------------------------------------
# reading a run directory's block back (compare)


def run_metrics(run_path: str | Path) -> dict[str, Any]:
    """A finished run's metrics.json; for a generate run made in shards (`--shard I/N` writes
    metrics.shard-I-of-N.json instead), the shards' together: their hours, wall time and tokens
    summed, their compute blocks added up. {} when there is neither."""
    run_path = Path(run_path)
    metrics = _json(run_path / "metrics.json")
    shards = [_json(p) for p in sorted(run_path.glob("metrics.shard-*-of-*.json"))] if not metrics else []
    shards = [m for m in shards if m]
    if not shards:
        return metrics
    merged: dict[str, Any] = {"stage": shards[0].get("stage"), "shards": len(shards)}
    for key in ("wall_time_s", "gpu_hours", "cpu_hours", "prompt_tokens", "completion_tokens", "samples"):
        values = [m[key] for m in shards if isinstance(m.get(key), (int, float))]
        if values:
            merged[key] = sum(values)
    blocks = [m.get("compute") for m in shards]
    if all(isinstance(b, Mapping) for b in blocks):
        merged["compute"] = add_blocks(blocks)
    return merged


def add_blocks(blocks) -> dict[str, Any]:
    """Blocks of one model's runs (a generate run's shards) as one: tokens summed, FLOPs
    recomputed from them with the first known N."""
    first = lambda key: next((b[key] for b in blocks if b.get(key) is not None), None)  # noqa: E731
    return block(blocks[0].get("counts_as", "training"), teacher_params=first("teacher_params"), student_params=first("student_params"),
                 student_trainable_params=first("student_trainable_params"),
                 **{key: sum(int(b.get(key) or 0) for b in blocks) for key in TOKEN_KEYS})  # fmt: skip


def ledger_of(run_path: str | Path) -> dict[str, Any] | None:
    """The `compute` block of a finished run directory (run_metrics: shards added up); for a
    run from before the ledger, an estimate from what its metrics and step records hold,
    marked `estimated` (prompt tokens and extra passes were not recorded then). None if it is
    not a finished run."""
    run_path = Path(run_path)
    metrics = run_metrics(run_path)
    if not metrics:
        return None
    if isinstance(metrics.get("compute"), Mapping):
        return dict(metrics["compute"])
    from distill.rundir import step_rows

    stage = metrics.get("stage")
    config = _yaml(run_path / "config.yaml")
    estimate: dict[str, Any] | None = None
    if stage == "generate":
        estimate = generate_block(
            str(config.get("model") or ""), _first(metrics, ("prompt_tokens",)),
            _first(metrics, ("completion_tokens", "generated_tokens", "teacher_tokens", "tokens_generated")),
        )  # fmt: skip
    elif stage == "filter":
        estimate = filter_block([config.get("traces")] if config.get("traces") else [])
    elif stage in ("train", "grpo", "onpolicy"):
        rows = step_rows(run_path)
        trained = sum(r.get("trained_tokens", 0) for r in rows) or _first(metrics, ("train_tokens", "tokens_trained", "trained_tokens", "tokens_seen"))
        estimate = block(
            "training", student_params=weights_params(run_path / "model") or weights_params(metrics.get("model_dir")), student_tokens_trained=trained,
            student_tokens_forward_backward=sum(r.get("tokens", r.get("trained_tokens", 0)) for r in rows) or trained,
            student_tokens_generated=sum(_generated(r) for r in rows),
            teacher_tokens_scored=sum(r.get("teacher_scored_tokens", 0) or 0 for r in rows),
            teacher_params=metrics.get("teacher_params") or weights_params(config.get("teacher")),
        )  # fmt: skip
    if estimate is not None and stage != "filter":
        estimate["estimated"] = "from a run without a compute block: prompt tokens and extra passes not counted"
    return estimate


def _first(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    return next((int(metrics[k]) for k in keys if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)), 0)


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}

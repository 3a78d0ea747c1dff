"""Student presets: a plain table of facts per DeepSeek-R1-Distill base. Not a factory.

`--student qwen-7b` fills in the `config` values below (shown as "preset qwen-7b" when a run
prints where each value came from; a recipe, flag or key=value overrides any of them), plus the
memory plan for the number of GPUs the job runs on.

Where the numbers come from:
- open-r1's OpenR1-Distill-7B recipe (recipes/OpenR1-Distill-7B/sft/config_distill.yaml):
  Qwen2.5-Math-7B with RoPE base raised to 300k and 32k positions, lr 4e-5, cosine decay to 10%
  of the peak (`cosine_with_min_lr`, min_lr_rate 0.1), warmup 3%, 5 epochs, global batch 128
  (2 per device x 8 accumulation x 8 GPUs), grad clip 0.2, 32k max length, no weight decay.
- open-r1's Qwen2.5-1.5B distillation recipes used lr 5e-5 with the same schedule.
- OpenThoughts' OpenThinker-32B (LlamaFactory): lr 1e-5, cosine, warmup 10%, 3 epochs, AdamW
  (0.9, 0.999), grad clip 1.0 (HF Trainer default). Used for the 14B, 32B and 70B students;
  their global batch is kept at 128 like open-r1's.
- No open recipe distils Llama-3.1-8B base: it gets the OpenR1-Distill-7B recipe as is.
- Qwen2.5-Math-{1.5B,7B} ship a 4k context (max_position_embeddings 4096, RoPE base 10k); the
  open reproductions raised the base to 300k for 32k sequences (open-r1/Qwen2.5-Math-7B-RoPE-300k),
  and so do these presets. Qwen2.5-14B/32B and Llama-3.1/3.3 already have 32k+ contexts.

Memory plans (per GPU count, 80 GB GPUs, 32k-token micro-batches; a count between two entries
gets the smaller one's plan). Full fine-tuning with AdamW
keeps 16 bytes per parameter (fp32 weights, gradients, two moments), sharded over the GPUs by
FSDP; activation checkpointing keeps one layer's activations at a time; CPU offload moves the
sharded states to host memory; LoRA keeps a bf16 base (2 bytes/param) and QLoRA a 4-bit one.
`estimate_memory_gb` is the arithmetic; `check_memory` refuses a plan that cannot fit, before
any weights are loaded (`check_memory=false` in a run skips it).
"""

from __future__ import annotations

from typing import Any

from distill.errors import ConfigError

_OPEN_R1_7B = dict(lr=4e-5, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03, epochs=5, global_batch=128, grad_clip=0.2, weight_decay=0.0)
_OPENTHINKER_32B = dict(lr=1e-5, schedule="cosine", min_lr_ratio=0.0, warmup_ratio=0.1, epochs=3, global_batch=128, grad_clip=1.0, weight_decay=0.0)

_FULL = dict(lora=False, quantize="none", activation_checkpointing=True, cpu_offload=False)
_FULL_OFFLOAD = dict(_FULL, cpu_offload=True)
_LORA = dict(_FULL, lora=True)
_LORA_OFFLOAD = dict(_LORA, cpu_offload=True)
_QLORA = dict(_LORA, quantize="4bit")  # one process only (bitsandbytes 4-bit weights are not sharded)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen-1.5b": {
        "model": "Qwen/Qwen2.5-Math-1.5B",
        "distilled": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        "params_b": 1.54,
        "source": "open-r1 OpenR1-Distill-7B schedule with open-r1's 1.5B lr (5e-5)",
        "config": dict(_OPEN_R1_7B, lr=5e-5, max_seq_len=32768, rope_theta=300000.0, max_position_embeddings=32768, chat_template="chatml-think"),
        "memory_plan": {1: _FULL},
    },
    "qwen-7b": {
        "model": "Qwen/Qwen2.5-Math-7B",
        "distilled": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "params_b": 7.62,
        "source": "open-r1 OpenR1-Distill-7B",
        "config": dict(_OPEN_R1_7B, max_seq_len=32768, rope_theta=300000.0, max_position_embeddings=32768, chat_template="chatml-think"),
        "memory_plan": {1: _LORA, 2: _FULL_OFFLOAD, 4: _FULL, 8: _FULL},
    },
    "qwen-14b": {
        "model": "Qwen/Qwen2.5-14B",
        "distilled": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        "params_b": 14.8,
        "source": "OpenThinker-32B (OpenThoughts) schedule, global batch 128",
        "config": dict(_OPENTHINKER_32B, max_seq_len=32768, chat_template="chatml-think"),
        "memory_plan": {1: _LORA, 2: _LORA, 4: _FULL_OFFLOAD, 8: _FULL},
    },
    "qwen-32b": {
        "model": "Qwen/Qwen2.5-32B",
        "distilled": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        "params_b": 32.8,
        "source": "OpenThinker-32B (OpenThoughts) schedule, global batch 128",
        "config": dict(_OPENTHINKER_32B, max_seq_len=32768, chat_template="chatml-think"),
        "memory_plan": {1: _QLORA, 2: _LORA, 8: _FULL_OFFLOAD, 16: _FULL},
    },
    "llama-8b": {
        "model": "meta-llama/Llama-3.1-8B",
        "gated": True,  # Meta's licence must be accepted on the hub; a token is needed to download
        "distilled": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        "params_b": 8.03,
        "source": "open-r1 OpenR1-Distill-7B (no open recipe for this base)",
        "config": dict(_OPEN_R1_7B, max_seq_len=32768, chat_template="llama3-think"),
        "memory_plan": {1: _LORA, 2: _FULL_OFFLOAD, 4: _FULL, 8: _FULL},
    },
    "llama-70b": {
        "model": "meta-llama/Llama-3.3-70B-Instruct",
        "gated": True,
        "distilled": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        "params_b": 70.6,
        "source": "OpenThinker-32B (OpenThoughts) schedule, global batch 128",
        "config": dict(_OPENTHINKER_32B, max_seq_len=32768, chat_template="llama3-think"),
        # One 80 GB GPU holds a 4-bit 70B plus 16k tokens of activations, not 32k.
        "memory_plan": {1: dict(_QLORA, max_seq_len=16384), 2: _LORA_OFFLOAD, 8: _LORA, 16: _FULL_OFFLOAD, 64: _FULL},
    },
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_values(name: str, gpus: int = 0) -> dict[str, Any]:
    """The TrainConfig values a preset fills in; the memory plan of the largest GPU count <= `gpus`
    is included when running on GPUs (on CPU the config's own defaults stand)."""
    if name not in PRESETS:
        raise ConfigError(f"no student preset named '{name}'; presets: {', '.join(PRESETS)} (or a hub id / local model path)")
    preset = PRESETS[name]
    values = dict(preset["config"])
    if gpus > 0:
        values.update(memory_plan(name, gpus))
    return values


def preset_limits(name: str) -> tuple[int, str] | None:
    """The smallest max_seq_len a preset trains with on any GPU count (its config's, or a memory
    plan's), and where it comes from: what `distill filter --student` checks lengths against.
    None when the preset sets none (training then uses the model's context)."""
    preset = PRESETS[name]
    found = [(int(preset["config"]["max_seq_len"]), f"preset {name}")] if preset["config"].get("max_seq_len") else []
    for gpus, plan in sorted(preset["memory_plan"].items()):
        if plan.get("max_seq_len"):
            found.append((int(plan["max_seq_len"]), f"preset {name}'s plan for {gpus} GPU{'s' if gpus > 1 else ''}"))
    return min(found, key=lambda item: item[0]) if found else None


def memory_plan(name: str, gpus: int) -> dict[str, Any]:
    plans = PRESETS[name]["memory_plan"]
    fitting = [count for count in plans if count <= gpus]
    return dict(plans[max(fitting)] if fitting else plans[min(plans)])


def estimate_memory_gb(
    params: float,
    world: int,
    *,
    lora: bool,
    quantize: str,
    cpu_offload: bool,
    activation_checkpointing: bool,
    tokens: int,
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    chunk_tokens: int,
) -> dict[str, float]:
    """Rough per-device memory (GiB) of a training plan: states, activations, total.

    states: full fine-tuning 16 B/param (fp32 weights + grads + 2 AdamW moments) sharded over
    `world`, plus one gathered bf16 block; LoRA 2 B/param bf16 base (0.55 with 4-bit) sharded,
    adapters negligible. CPU offload leaves only the gathered blocks on the device.
    activations (bf16, per micro-batch of `tokens`): with checkpointing, each block's input
    (T*H*2 bytes per layer) plus one block recomputed (about T*(16H + 3I) bytes*2 / 2); without,
    every block's. Plus one chunk of fp32 logits and its gradient."""
    gib = 2**30
    block = 12 * hidden * hidden + 3 * hidden * intermediate  # params of one decoder block, roughly
    if cpu_offload:
        states = 0.0
    elif lora:
        states = params * (0.55 if quantize == "4bit" else 2.0) / world
    else:
        states = params * 16.0 / world
    states += 2 * 2.0 * block  # gathered bf16 blocks (current + prefetched)
    one_block = tokens * (16 * hidden + 3 * intermediate) * 2
    saved = tokens * hidden * 2 * layers if activation_checkpointing else one_block * layers
    logits = 2 * min(tokens, chunk_tokens) * vocab * 4
    activations = saved + one_block + logits
    return {"states": states / gib, "activations": activations / gib, "total": (states + activations) / gib}


def estimate_host_memory_gb(params: float, world: int, local_world: int, *, load_bytes: int, device_states_gb: float, on_gpu: bool, cpu_offload: bool) -> dict[str, float]:
    """Host (CPU) memory one node needs (GiB): `full_copy`, the one full copy of the weights that
    loading holds (rank 0's, in the load dtype, `load_bytes` per parameter; a single CPU process
    trains on it, so it is not counted twice there) and `per_rank`, what each of the node's
    `local_world` processes keeps in host memory while training: everything on CPU
    (`device_states_gb` is then the whole per-rank estimate), the offloaded states with CPU offload
    on GPUs, else nothing worth counting. `node` = full_copy + local_world * per_rank."""
    gib = 2**30
    full_copy = 0.0 if (not on_gpu and world == 1) else params * load_bytes / gib
    if not on_gpu:
        per_rank = device_states_gb
    elif cpu_offload:
        per_rank = device_states_gb
    else:
        per_rank = 0.0
    return {"full_copy": full_copy, "per_rank": per_rank, "node": full_copy + local_world * per_rank}


def check_host_memory(estimate: dict[str, float], available_gb: float, local_world: int) -> None:
    """Refuse, with the fix, a plan whose host memory exceeds what this node has free."""
    if estimate["node"] > available_gb:
        raise ConfigError(
            f"not enough host memory on this node: loading holds one full copy of the weights ({estimate['full_copy']:.1f} GiB, on rank 0) "
            f"and each of its {local_world} processes keeps {estimate['per_rank']:.1f} GiB, about {estimate['node']:.1f} GiB in all; "
            f"{available_gb:.1f} GiB are free; use lora=true, fewer processes per node, or a node with more memory (check_memory=false tries anyway)"
        )


def check_memory(estimate: dict[str, float], available_gb: float, where: str, plan: str) -> None:
    """Refuse, with the fix, a plan whose estimate exceeds what the device has."""
    if estimate["total"] > available_gb:
        raise ConfigError(
            f"not enough memory on {where}: the plan ({plan}) needs about {estimate['total']:.1f} GiB per device "
            f"(states {estimate['states']:.1f}, activations {estimate['activations']:.1f}), {available_gb:.1f} GiB are free; "
            "use more GPUs (torchrun), lora=true, cpu_offload=true, activation_checkpointing=true or a smaller micro_batch_tokens "
            "(check_memory=false tries anyway)"
        )

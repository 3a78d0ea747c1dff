"""Process-group setup and FSDP2 sharding, shared by `distill train` and `distill grpo`.

One code path from one CPU process to many GPU nodes:
- launched as is, a job is one process (world size 1) on the first GPU, or on the CPU;
- launched under `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK set), it joins the process group:
  NCCL on GPUs (one device per local rank), gloo on CPUs.

With more than one process the model is sharded with FSDP2 (`fully_shard`): each decoder
layer is its own unit (all-gathered just before it runs, freed after), and the root module
holds the embeddings, final norm and LM head. On GPUs parameters are kept in fp32 and computed
in bf16 (MixedPrecisionPolicy, gradients reduced in fp32), optionally offloaded to CPU memory.
A single GPU process skips sharding and uses autocast to bf16 over fp32 weights (the same
arithmetic). CPU runs stay in fp32.

Gradient averaging: FSDP divides reduced gradients by the world size; callers that normalise
the loss by a global token count multiply it back (see `Dist.world`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mixed_precision: bool = False  # bf16 compute over fp32 weights (GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of small float lists over all ranks (one all-reduce)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())

    def broadcast(self, obj: Any) -> Any:
        """`obj` of rank 0, on every rank (e.g. an error to raise everywhere, a decision)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def autocast(self):
        """bf16 autocast for an unsharded GPU model; FSDP's policy does this when sharded."""
        if self.mixed_precision and not self.distributed:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def init_distributed(dtype: str = "auto", timeout_minutes: int = 60) -> Dist:
    """Join the torchrun process group if launched under torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if cuda else None,
        )
    mixed = cuda and dtype in ("auto", "bfloat16")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, mixed_precision=mixed)


def close_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated decoder blocks (transformers lists them in _no_split_modules)."""
    from distill.students.logprobs import causal_lm

    names = set(getattr(causal_lm(model), "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(causal_lm(model)).__name__} does not declare its decoder blocks (_no_split_modules); cannot shard it")
    return names


def shard(module: nn.Module, dist: Dist, cpu_offload: bool = False) -> nn.Module:
    """FSDP2-shard `module` (e.g. a Scorer) when there is more than one process: one unit per
    decoder block, then the root. A single process gets the module back, moved to its device."""
    if not dist.distributed:
        return module.to(dist.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dist.mixed_precision else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    names = block_classes(module)
    for sub in module.modules():
        if type(sub).__name__ in names:
            fully_shard(sub, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # The root's parameters stay gathered after forward: the backward needs them at once.
    fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return module


def load_sharded(build: Callable[[bool], nn.Module], wrap: Callable[[nn.Module], nn.Module], dist: Dist, cpu_offload: bool = False) -> nn.Module:
    """`wrap(build(meta))`, FSDP2-sharded, without a full copy of the model on every rank.

    `build(False)` builds the real model (weights read from disk in the target dtype) and
    `build(True)` the same modules on the meta device (no memory). One process: the real model,
    moved to its device. Several: rank 0 alone builds the real model; every rank (rank 0 too)
    shards a meta copy and allocates only its own shards (`to_empty`); then rank 0's tensors are
    broadcast one at a time and each rank keeps its slice (torch.distributed.checkpoint's
    `set_model_state_dict` with `broadcast_from_rank0`, the path torchtitan and accelerate take).
    Buffers (rotary frequencies are not in the state dict) are broadcast from rank 0 as well.
    So a node holds one full copy (rank 0's, freed once loaded) plus one shard per rank.
    """
    if not dist.distributed:
        return shard(wrap(build(False)), dist, cpu_offload)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    source: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if dist.is_main:
        full = wrap(build(False))
        source = full.state_dict()
        buffers = dict(full.named_buffers())
        del full
    module = shard(wrap(build(True)), dist, cpu_offload)
    module.to_empty(device="cpu" if cpu_offload else dist.device)
    set_model_state_dict(module, source, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            carrier = buffers[name].to(buffer.device, buffer.dtype) if dist.is_main else buffer
            if carrier.device.type == "cpu" and dist.device.type == "cuda":  # NCCL moves GPU tensors only
                carrier = carrier.to(dist.device)
            torch.distributed.broadcast(carrier, src=0)
            buffer.copy_(carrier)
    del source, buffers
    return module


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)

"""Checkpoints that survive kill -9, and the final Hugging Face export. Shared by train and grpo.

A checkpoint is a directory `CHECKPOINTS/step-00000120/` holding:
- `state/`: model and optimizer state in torch.distributed.checkpoint (DCP) format: every rank
  writes its own shards in parallel, and a later run may load them on another number of ranks.
  Only trainable parameters are saved (a LoRA run saves its adapter; the frozen base is reloaded
  from its source on resume);
- `scheduler.pt`: the LR scheduler's state;
- `rng-<rank>.pt`: each rank's Python, NumPy, torch CPU and CUDA generator states;
- `trainer.json`: the caller's state (step, epoch, data position, ...), written last.

Atomicity: everything is written into `step-N.partial/`; after every rank is done, rank 0
renames it to `step-N/` (one rename: a checkpoint is either whole or absent) and then points
`latest` at it (written to a temporary file and renamed). A run killed at any moment leaves the
previous checkpoint intact; leftover `.partial` directories are removed at the next start. On a
cluster, CHECKPOINTS must be on a filesystem every node sees.

Export (`export_model`): the full weights are gathered to rank 0 (FSDP shards included), put into
a model built on the meta device (no second copy in memory), LoRA merged into the base when
asked, cast to the export dtype, and saved with `save_pretrained` next to the tokenizer (with its
chat template) and a generation config, into `OUT.partial/`, renamed to OUT when complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.students.parallel import Dist

LATEST = "latest"
STATE = "state"
TRAINER = "trainer.json"


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


class Checkpointer:
    def __init__(self, folder: str | Path, dist: Dist, keep: int = 2):
        self.folder = Path(folder)
        self.dist = dist
        self.keep = max(1, keep)
        # The folder is made by the first save, so a run refused before training (bad input, too
        # little memory) leaves no checkpoints/ behind.
        if dist.is_main and self.folder.is_dir():
            for stale in self.folder.glob("*.partial"):  # a save cut short by a crash
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text(encoding="utf-8").strip()
        return path if (path / TRAINER).is_file() else None

    def state(self, path: str | Path) -> dict[str, Any]:
        """The trainer state of a checkpoint (step, ...), without loading any tensor."""
        return json.loads((Path(path) / TRAINER).read_text(encoding="utf-8"))

    def save(self, step: int, model: nn.Module, optimizer, scheduler=None, state: dict[str, Any] | None = None) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        name = f"step-{step:08d}"
        final = self.folder / name
        partial = self.folder / f"{name}.partial"
        if self.dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.dist.barrier()
        options = _options(ignore_frozen_params=True)
        states = {"model": get_model_state_dict(model, options=options), "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(states, checkpoint_id=partial / STATE)
        torch.save(_rng_state(), partial / f"rng-{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.is_main:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), partial / "scheduler.pt")
            _write_text(partial / TRAINER, json.dumps({"step": step, **(state or {})}, indent=2))
            _fsync_tree(partial)
            if final.exists():  # same step saved before (a rerun): replace it whole
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_text(self.folder / LATEST, name)
            self._prune(keep_name=name)
        self.dist.barrier()
        return final

    def load(self, path: str | Path, model: nn.Module, optimizer, scheduler=None) -> dict[str, Any]:
        """Restore model, optimizer, scheduler and RNG in place; returns the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(path)
        options = _options(ignore_frozen_params=True)
        states = {"model": get_model_state_dict(model, options=options), "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(states, checkpoint_id=path / STATE)
        set_model_state_dict(model, states["model"], options=_options(ignore_frozen_params=True, strict=False))
        set_optimizer_state_dict(model, optimizer, states["optimizer"], options=options)
        if scheduler is not None and (path / "scheduler.pt").is_file():
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng = path / f"rng-{self.dist.rank}.pt"
        if rng.is_file():  # absent when resuming on more ranks than saved: fresh streams then
            _set_rng_state(torch.load(rng, weights_only=False))
        return self.state(path)

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------
# export


def full_state_dict(model: nn.Module, dist: Dist) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole and on CPU, on rank 0 (an empty dict elsewhere).
    All ranks must call it (FSDP shards are all-gathered)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else {}


def export_model(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    dist: Dist,
    *,
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
    generation_config=None,
) -> Path | None:
    """Write a Hugging Face model directory that transformers and vLLM load as is.

    `model` is the trained causal LM (plain, peft-wrapped, or FSDP-sharded; not a Scorer). With
    peft and merge_lora=False only the adapter is written (load it with peft). Returns OUT on
    rank 0, None elsewhere; all ranks must call it."""
    quantized = is_quantized(model)
    state = {} if quantized else full_state_dict(model, dist)
    out = Path(out)
    if dist.is_main:
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if quantized and not merge_lora:  # QLoRA's adapter alone: peft writes it from the live model
            rebuilt = model
        elif quantized:  # QLoRA: the 4-bit base dequantized, the adapter merged in full precision
            rebuilt = _rebuild_on_meta(model, merged_weights(model), plain=True)
        else:
            rebuilt = _rebuild_on_meta(model, state)
        if hasattr(rebuilt, "merge_and_unload") and merge_lora:
            rebuilt = rebuilt.merge_and_unload()
        if dtype is not None:
            rebuilt = rebuilt.to(dtype)
        rebuilt.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if generation_config is not None:
            generation_config.save_pretrained(partial)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    dist.barrier()
    return out if dist.is_main else None


def _rebuild_on_meta(model: nn.Module, state: dict[str, torch.Tensor], plain: bool = False) -> nn.Module:
    """A fresh copy of `model`'s architecture holding `state` (tensors assigned, not copied).
    plain=True: the base model alone, unquantised (for `merged_weights`, LoRA already merged)."""
    import copy

    from transformers import AutoModelForCausalLM

    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    config = copy.deepcopy(base.config)
    for name in ("quantization_config", "_pre_quantization_dtype"):  # the export holds plain weights
        if hasattr(config, name):
            delattr(config, name)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    if peft_config and not plain:
        from peft import get_peft_model

        with torch.device("meta"):
            fresh = get_peft_model(fresh, peft_config["default"])
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if not _is_tied(fresh, k)]:
        raise RuntimeError(f"export: state does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    fresh.generation_config = base.generation_config
    return fresh


def _is_tied(model: nn.Module, key: str) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


# --------------------------------------------------------------------------------------------
# QLoRA: bitsandbytes 4-bit weights


def is_quantized(model: nn.Module) -> bool:
    """True for a model holding bitsandbytes 4-bit weights (QLoRA)."""
    return any(hasattr(p, "quant_state") for p in model.parameters())


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a QLoRA model as plain tensors under the base model's names: every 4-bit
    weight dequantized (bitsandbytes `dequantize_4bit`), and for a peft model each LoRA layer's
    delta (`get_delta_weight`: B @ A * scaling) added in full precision. Nothing is modified in
    place: peft's `merge_adapter` on a 4-bit layer would requantise the sum and so move the
    frozen base a little at every call. Shared by the export and GRPO's weight sync to vLLM.
    One process only (QLoRA is never sharded). Weights come out in the 4-bit layers' compute
    dtype (bf16 under QLoRA on GPU), other tensors as stored."""
    import bitsandbytes.functional as bnb_functional

    from distill.students.logprobs import causal_lm

    lm = causal_lm(model)
    raw = lm.state_dict(keep_vars=True)
    quantized = {key for key, value in raw.items() if hasattr(value, "quant_state")}
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in raw.items():
            if "lora_" in key or key.partition(".weight.")[0] + ".weight" in quantized and key not in quantized:
                continue  # adapters (added below) and the quantisation statistics of 4-bit weights
            if key in quantized:
                value = bnb_functional.dequantize_4bit(value.data, value.quant_state).to(value.quant_state.dtype)
            state[key.replace(".base_layer.", ".")] = value.detach()
        for name, module in lm.named_modules():
            if not hasattr(module, "get_delta_weight") or getattr(module, "merged", False):
                continue
            weight = state[f"{name}.weight"]
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = weight
    return state

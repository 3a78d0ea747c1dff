"""Students: presets, chat templates, training data, the SFT loop, and what GRPO shares with it.

    presets.py     the six DeepSeek-R1-Distill bases: a table of facts and memory plans
    chat.py        chat templates for base models (`<think>` prefill), chosen and checked
    data.py        conversations -> token ids + loss mask (the one place); packing; batching
    logprobs.py    per-token log-probs and summed NLL without full logits (shared with grpo)
    parallel.py    torchrun process group, FSDP2 sharding (shared with grpo)
    checkpoint.py  atomic save/resume, Hugging Face export (shared with grpo)
    sft.py         `distill train`: the loop

Nothing here imports torch at package import time.
"""

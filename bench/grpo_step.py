"""Seconds per `distill grpo` step, split into rollout (generation + grading) and update.

    python bench/grpo_step.py                      # CPU, a tiny Qwen2 model (the figures in docs/benchmarks.md)
    python bench/grpo_step.py --shape qwen2.5-1.5b --device cuda   # GPU: a Qwen2.5-1.5B-shaped model
    python bench/grpo_step.py --write              # also append the section to docs/benchmarks.md

The model is built from a config with random weights (no hub access), so it rarely emits its
end-of-sequence token: every completion runs to max_tokens, which makes the work per step the
same on every run (P prompts x G completions x max_tokens tokens). Problems are synthetic
additions; their rewards do not matter for timing. The real loop runs (`distill.students.grpo.run`),
with the hf engine and the shared verifier, and the split is read from its metrics.jsonl; the
first step is reported apart (it includes warm-up) and the rest as their median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads: the tiny test-bed model and Qwen2.5-1.5B's shape
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
SETTINGS = {
    "cpu": dict(group_size=8, prompts_per_step=4, max_tokens=64, micro_batch_size=8),
    "cuda": dict(group_size=8, prompts_per_step=16, max_tokens=1024, micro_batch_size=8),
}


def build_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer_dir = ROOT.parent / "shared" / "data" / "tokenizers" / "qwen2.5-instruct"
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:  # a fresh clone without ../shared: a character tokenizer keeps the bench runnable
        import string

        from distill.chartok import build_char_tokenizer

        tokenizer = build_char_tokenizer(string.printable)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=32768, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape],
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variant", default="grpo")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="append the section to docs/benchmarks.md")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # grpo puts the policy on CUDA when it sees one
    if args.threads:
        torch.set_num_threads(args.threads)

    from distill.config import load_config
    from distill.students.grpo import GRPOConfig, run

    settings = SETTINGS[args.device]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(args.shape, tmp / "model")
        data = tmp / "problems.jsonl"
        data.write_text("".join(json.dumps({"id": f"p{a}-{b}", "problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                                for a in range(10) for b in range(10)))
        overrides = [f"{k}={v}" for k, v in settings.items()] + [f"steps={args.steps}", f"variant={args.variant}", "save_every=1000000"]
        cfg = load_config(GRPOConfig, flags={"student": str(model_dir), "data": str(data), "out": str(tmp / "run")}, overrides=overrides).config
        started = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]

    rest = rows[1:] or rows
    rollout = statistics.median(r["rollout_s"] for r in rest)
    update = statistics.median(r["update_s"] for r in rest)
    tokens = statistics.median(r["completion_length"] * r["completions"] for r in rest)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    section = "\n".join([
        f"### distill grpo: seconds per step ({args.shape} model, {args.device})",
        "",
        f"`python bench/grpo_step.py --shape {args.shape} --device {args.device} --steps {args.steps}"
        + (f" --threads {args.threads}" if args.threads else "") + "`",
        f"on {device}; torch {torch.__version__}; variant {args.variant}; "
        + ", ".join(f"{k}={v}" for k, v in settings.items()) + "; hf engine.",
        "",
        "| phase | seconds per step (median of steps 2..N) | first step |",
        "|---|---|---|",
        f"| rollout (generate + grade) | {rollout:.3f} | {rows[0]['rollout_s']:.3f} |",
        f"| update (log-probs, loss, backward, optimizer) | {update:.3f} | {rows[0]['update_s']:.3f} |",
        f"| total | {rollout + update:.3f} | {rows[0]['rollout_s'] + rows[0]['update_s']:.3f} |",
        "",
        f"Completion tokens per step: {tokens:.0f}; rollout share of the step: {rollout / (rollout + update):.0%}; "
        f"whole run including model load: {wall:.1f} s for {args.steps} steps.",
        "",
    ])
    print(section)
    if args.write:
        with (ROOT / "docs" / "benchmarks.md").open("a", encoding="utf-8") as handle:
            handle.write("\n" + section)


if __name__ == "__main__":
    main()

"""GPU benchmark of `distill train`: a Qwen2.5-1.5B-shaped student at 16k packed tokens.

    python bench/sft_gpu.py                          # on a machine with one CUDA GPU
    python bench/sft_gpu.py --write docs/benchmarks.md
    python bench/sft_gpu.py --tiny                   # the same steps with a tiny model, on CPU (a dry run)

What it measures, all through the real command (`distill train`, one process per run):
1. throughput: Qwen2.5-1.5B's architecture (28 layers, hidden 1536, 151,936-token vocabulary,
   random weights from a fixed seed), full fine-tuning, bf16 compute over fp32 weights, micro-
   batches of 16,384 packed tokens, activation checkpointing; tokens/s, MFU (6N plus attention
   FLOPs over the GPU's dense bf16 peak) and peak memory, median over the steps after the first;
2. the longest sequence that fits: one sequence of L tokens per step for L in 16k, 32k, 48k,
   64k, 96k, 128k, until a run runs out of memory.
Targets (issue #5): MFU >= 45%, 64k context for 1.5B full fine-tuning. Data are synthetic
conversations (random words) rendered with the Qwen2.5 tokenizer from ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILL_SHARED_DATA", ROOT.parent / "shared" / "data"))
SECTION = "## `distill train` on a GPU: Qwen2.5-1.5B shape"
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=151936, tie_word_embeddings=True)  # fmt: skip
WORDS = "the of a to in is that for it as with on be by this are we at from or an which one can all there their".split()


def make_model(out: Path, shape: dict, max_positions: int) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5-instruct")
    config = Qwen2Config(**shape, max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)  # stored in bf16, as the real checkpoint is
    tokenizer.save_pretrained(out)


def make_data(path: Path, count: int, tokens: tuple[int, int], seed: int = 0) -> None:
    """`count` conversations whose assistant turns hold about tokens[0]..tokens[1] tokens."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            length = rng.randint(*tokens)
            reply = " ".join(rng.choice(WORDS) for _ in range(length))  # one token per common word
            handle.write(json.dumps({"messages": [{"role": "user", "content": "Solve it."}, {"role": "assistant", "content": reply}]}) + "\n")


def distill_train(model: Path, data: Path, out: Path, *overrides: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distill.cli", "train", "--student", str(model), "--data", str(data), "--out", str(out), *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), HF_HUB_OFFLINE="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines()) if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-sft-gpu")
    parser.add_argument("--tokens", type=int, default=16384, help="packed tokens per micro-batch for the throughput runs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--contexts", default="16384,32768,49152,65536,98304,131072")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/sft_gpu.py needs a CUDA GPU (or --tiny for a dry run on CPU)")
    shape = TINY if args.tiny else QWEN_1_5B
    contexts = [int(c) for c in args.contexts.split(",")]
    global_batch = 32
    if args.tiny:
        args.tokens, args.steps, contexts, global_batch = 512, 3, [256, 512], 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "model"
    if not (model / "config.json").is_file():
        make_model(model, shape, max(contexts + [args.tokens]))

    # 1. throughput at --tokens packed tokens per micro-batch
    data = args.workdir / "data.jsonl"
    make_data(data, global_batch * args.steps, (args.tokens // 16, args.tokens // 4))
    out = args.workdir / "throughput"
    common = ["activation_checkpointing=true", "schedule=constant", "warmup_ratio=0", "save_every=1000000", "lr=1e-5"]
    done = distill_train(model, data, out, f"max_seq_len={args.tokens}", f"micro_batch_tokens={args.tokens}", f"global_batch={global_batch}",
                         f"max_steps={args.steps}", *common)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"throughput run failed:\n{done.stderr[-3000:]}")
    records = steps(out)[1:]  # the first step warms up kernels and the allocator
    throughput = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "mfu": statistics.median(r["mfu"] for r in records) if records[0]["mfu"] is not None else None,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
        "micro_batches": records[0]["micro_batches"],
    }

    # 2. the longest single sequence that fits
    fits = []
    for length in contexts:
        data = args.workdir / f"context-{length}.jsonl"
        make_data(data, 2, (int(length * 0.97), int(length * 0.97)))
        out = args.workdir / f"context-{length}"
        # check_memory=false: measure what fits rather than trust the estimate
        done = distill_train(model, data, out, f"max_seq_len={length + 64}", "global_batch=1", "max_steps=1", "too_long=truncate",
                             "check_memory=false", *common)  # fmt: skip
        record = (steps(out) or [None])[0]
        ok = done.returncode == 0 and record is not None
        fits.append({"tokens": length, "fits": ok, "peak_memory_gb": record["peak_memory_gb"] if record else None,
                     "tokens_per_s": record["tokens_per_s"] if record else None,
                     "error": None if ok else done.stderr.strip().splitlines()[-1][:160] if done.stderr.strip() else f"rc {done.returncode}"})  # fmt: skip
        if not ok:
            break
    section = report(throughput, fits, args)
    print(section)
    if args.write and not args.tiny:
        from sft_vs_trl import replace_section  # same folder

        replace_section(args.write, section)


def report(throughput: dict, fits: list[dict], args) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    longest = max((f["tokens"] for f in fits if f["fits"]), default=0)
    mfu = f"{throughput['mfu']:.1%}" if throughput["mfu"] is not None else "n/a"
    lines = [
        SECTION,
        "",
        f"Command: `python bench/sft_gpu.py`. Device: {device}; torch {torch.__version__}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| tokens/s at {args.tokens:,} packed tokens per micro-batch | {throughput['tokens_per_s']:,.0f} | |",
        f"| MFU | {mfu} | >= 45% |",
        f"| peak memory | {throughput['peak_memory_gb']:.1f} GB | |",
        f"| longest sequence that fits (full fine-tuning, activation checkpointing) | {longest:,} tokens | 65,536 |",
        "",
        "| sequence length | fits | peak memory (GB) | tokens/s |",
        "|---|---|---|---|",
    ]
    for f in fits:
        memory = f"{f['peak_memory_gb']:.1f}" if f["peak_memory_gb"] is not None else "-"
        rate = f"{f['tokens_per_s']:,.0f}" if f["tokens_per_s"] is not None else "-"
        lines.append(f"| {f['tokens']:,} | {'yes' if f['fits'] else 'no: ' + (f['error'] or '')} | {memory} | {rate} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

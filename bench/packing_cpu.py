"""Benchmark: packed against padded `distill train` on CPU, on the long traces of bench/sft_vs_trl.py.

    python bench/packing_cpu.py                                   # prints a Markdown section
    python bench/packing_cpu.py --write docs/benchmarks.md

Same data and model as bench/sft_vs_trl.py (its `prepare`): the first --sequences Sky-T1 MATH-500
traces of at most --max-len tokens, rendered with the Qwen2.5 template and tokenizer; a 2-layer
Qwen2 (hidden 64) with Qwen2.5's vocabulary. Every run: `distill train`'s loop, 1 epoch, 8
sequences per step, fp32, lr 1e-3 constant. Configurations, each in its own process, in turn,
for --rounds rounds:
- packed, sdpa_varlen: the default (attn_implementation=auto): packed micro-batches of --max-len
  tokens, SDPA run on each sequence of a packed row alone (distill/students/attention.py);
- packed, sdpa + mask: the same batches with attn_implementation=sdpa: transformers' packed-
  sequence mask, SDPA over the whole (T, T) square of each row (distill's default until now);
- padded: packing=false, 2 sequences per micro-batch padded to the longer (attention through
  the same sdpa path, with a padding mask).
Figure: useful (non-padding) tokens per CPU-second of the training loop (its CPU time, all
threads: the fair measure when other jobs share the cores), median over rounds; wall rates too.

This model's cost is its 151k-token LM head (hidden 64), the same for every configuration, so
a second table isolates the attention: one attention layer, forward + backward, over the packed
rows this data makes (the plan `distill train` computes), sdpa_varlen against the packed mask,
in this model's shape and in Qwen2.5-1.5B's (12 heads, 2 KV heads, head dim 128).
`--reuse` redoes only that table and the report from the runs already in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CONFIGS = {
    "packed-varlen": ("packed, sdpa_varlen (default)", ["packing=true"]),
    "packed-mask": ("packed, sdpa + packed-sequence mask (before)", ["packing=true", "attn_implementation=sdpa"]),
    "padded": ("padded, 2 per micro-batch", ["packing=false", "micro_batch_size=2"]),
}
SECTION = "## Packed vs padded training on CPU (`bench/packing_cpu.py`)"


def worker(workdir: Path, name: str, round_: int, max_len: int) -> dict:
    from distill.config import load_config
    from distill.students.sft import TrainConfig, run

    out = workdir / f"{name}-{round_}"
    flags = {"student": str(workdir / "base"), "data": str(workdir / "train.jsonl"), "out": str(out)}
    overrides = [f"max_seq_len={max_len}", "global_batch=8", "epochs=1", "lr=1e-3", "schedule=constant", "warmup_ratio=0",
                 "grad_clip=1.0", "save_every=1000000", *CONFIGS[name][1]]  # fmt: skip
    run(load_config(TrainConfig, flags=flags, overrides=overrides).config)
    from sft_vs_trl import step_totals  # same folder: the same totals as the TRL comparison

    return step_totals(out)


def attention_layers(workdir: Path, max_len: int) -> list[dict]:
    """CPU milliseconds of one attention layer (forward + backward) summed over the packed rows
    of one epoch, per kernel and shape."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from distill.students.attention import varlen_attention
    from distill.students.chat import resolve_template
    from distill.students.data import encode_dataset, epoch_order, plan_step, read_conversations

    tokenizer = AutoTokenizer.from_pretrained(workdir / "base")
    conversations, _ = read_conversations(workdir / "train.jsonl")
    examples = encode_dataset(conversations, tokenizer, resolve_template("auto", tokenizer), max_len, progress=False).examples
    lengths = [len(e) for e in examples]
    rows = []
    order = epoch_order(len(lengths), 42, 0).tolist()
    for start in range(0, len(order), 8):  # 8 sequences per step, as the runs
        for micro in plan_step(lengths, order[start : start + 8], 1, True, max_len, 1)[0]:
            rows.append([lengths[i] for i in micro])
    shapes = {"this model (4 heads, 2 KV, dim 16)": (4, 2, 16), "Qwen2.5-1.5B layer (12 heads, 2 KV, dim 128)": (12, 2, 128)}
    results = []
    for label, (heads, kv_heads, dim) in shapes.items():
        layer = type("Layer", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True, "training": True})()
        seconds = {"sdpa_varlen": 0.0, "packed mask": 0.0}
        generator = torch.Generator().manual_seed(0)
        for row in rows:
            total = sum(row)
            q = torch.randn(1, heads, total, dim, generator=generator)
            k, v = torch.randn(1, kv_heads, total, dim, generator=generator), torch.randn(1, kv_heads, total, dim, generator=generator)
            positions = torch.cat([torch.arange(n) for n in row])[None]
            segments = torch.cat([torch.full((n,), i) for i, n in enumerate(row)])

            def masked(a, b, c):  # what transformers' packed-sequence mask makes sdpa compute
                mask = (segments[:, None] == segments[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
                return sdpa_attention_forward(layer, a, b, c, mask[None, None])[0]

            def varlen(a, b, c):
                return varlen_attention(layer, a, b, c, None, position_ids=positions)[0]

            for name, kernel in (("sdpa_varlen", varlen), ("packed mask", masked)):
                inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
                started = time.process_time()
                kernel(*inputs).sum().backward()
                seconds[name] += time.process_time() - started
        results.append({"shape": label, "rows": len(rows), "tokens": sum(map(sum, rows)), **{f"{name}_cpu_s": value for name, value in seconds.items()}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-packing-cpu")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section in a Markdown file")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reuse", action="store_true", help="reuse --workdir's runs; redo only the attention-layer table")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, also on a machine with a GPU

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = worker(args.workdir, args.worker, args.round, args.max_len)
        (args.workdir / f"{args.worker}-{args.round}.json").write_text(json.dumps(result, indent=2))
        return

    import shutil

    from sft_vs_trl import prepare, replace_section  # same folder: the same data and model

    if not args.reuse:
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        (args.workdir / "data.json").write_text(json.dumps(prepare(args.workdir, args.sequences, args.max_len)))
    data = json.loads((args.workdir / "data.json").read_text())
    print(f"data: {data}", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS=str(args.threads))
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for name in CONFIGS:
            if args.reuse:
                results[name].append(json.loads((args.workdir / f"{name}-{round_}.json").read_text()))
                continue
            print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr)
            command = [sys.executable, __file__, "--worker", name, "--round", str(round_), "--workdir", str(args.workdir),
                       "--max-len", str(args.max_len), "--threads", str(args.threads)]  # fmt: skip
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[name].append(json.loads((args.workdir / f"{name}-{round_}.json").read_text()))
            load.append(os.getloadavg()[0])
    import torch

    torch.set_num_threads(args.threads)
    layers = attention_layers(args.workdir, args.max_len)
    load.append(os.getloadavg()[0])
    section = report(results, data, args, load, layers)
    print(section)
    if args.write:
        replace_section(args.write, section)


def report(results: dict[str, list[dict]], data: dict, args, load: list[float], layers: list[dict]) -> str:
    import torch
    import transformers

    def rate(r: dict) -> float:
        return r["useful_tokens"] / r["cpu_seconds"]

    padded = statistics.median(rate(r) for r in results["padded"])
    lines = [
        SECTION,
        "",
        f"Command: `python bench/packing_cpu.py --sequences {args.sequences} --max-len {args.max_len} --rounds {args.rounds} --threads {args.threads}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{min(load):.1f}-{max(load):.1f} during the run), {args.threads} torch threads, no GPU; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {date.today().isoformat()}.  ",
        f"Data: {data['sequences']} Sky-T1 MATH-500 traces, {data['min_len']}-{data['max_len']} tokens (mean {data['mean_len']:.0f}), "
        f"{data['tokens']:,} tokens (bench/sft_vs_trl.py's). Model: 2-layer Qwen2, hidden 64, Qwen2.5 vocabulary.",
        "",
        "| configuration | useful tokens per CPU-s (median) | each round | vs padded | useful tokens/s (wall, median) | padding | micro-batches | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (label, _) in CONFIGS.items():
        runs = results[name]
        median = statistics.median(rate(r) for r in runs)
        wall = statistics.median(r["useful_tokens"] / r["seconds"] for r in runs)
        padding = 1 - runs[0]["useful_tokens"] / runs[0]["processed_tokens"]
        lines.append(
            f"| {label} | {median:,.0f} | {', '.join(f'{rate(r):,.0f}' for r in runs)} | {median / padded:.2f}x | {wall:,.0f} | "
            f"{padding:.0%} | {runs[0]['micro_batches']} | {runs[0]['final_loss']:.3f} |"
        )
    lines += [
        "",
        f"One attention layer, forward + backward, over the {layers[0]['rows']} packed rows of the epoch ({layers[0]['tokens']:,} tokens), "
        "CPU seconds (fp32, random inputs):",
        "",
        "| layer shape | sdpa_varlen | packed mask (sdpa over the T x T square) | speed-up |",
        "|---|---|---|---|",
    ]
    for layer in layers:
        lines.append(f"| {layer['shape']} | {layer['sdpa_varlen_cpu_s']:.2f} | {layer['packed mask_cpu_s']:.2f} | {layer['packed mask_cpu_s'] / layer['sdpa_varlen_cpu_s']:.1f}x |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

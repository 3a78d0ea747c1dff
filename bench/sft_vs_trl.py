"""Benchmark: `distill train`'s loop against TRL's SFTTrainer, same tiny model, data and machine.

    python bench/sft_vs_trl.py                       # prints a Markdown section
    python bench/sft_vs_trl.py --write docs/benchmarks.md

Data: real variable-length long chain-of-thought traces (../shared/data/traces, Sky-T1 on
MATH-500), rendered with the Qwen2.5 chat template and tokenizer; the first --sequences traces of
at most --max-len tokens train, the next 16 are held out. Model: a 2-layer Qwen2 (hidden 64) with
Qwen2.5's 151,665-token vocabulary, random weights from a fixed seed (the LM head dominates the
cost, as in small real students). Every trainer: 1 epoch, 8 sequences per optimizer step, lr
1e-3 constant, grad clip 1.0, fp32, no activation checkpointing, loss on the completion only.

Configurations (each in its own process, run one after the other):
- distill (packed): our defaults: padding-free packing into micro-batches of --max-len tokens.
- distill (padded): packing=false, 2 sequences per micro-batch padded to the longest.
- TRL default: SFTTrainer's defaults (8 sequences per device batch, padded to the longest, no
  packing).
- TRL packed (its best): packing=True, packing_strategy="bfd" (padding-free, position ids), rows
  of --max-len tokens, accumulation set so that it takes as many steps as the others.
gradient_checkpointing=False for TRL (its default is True) so that all runs do the same work.

Figures: useful (non-padding) tokens per CPU-second of the training loop (and per wall second),
padding fraction of the tokens run through the model, peak RSS of the process, final training
loss, and the loss of the trained model on the held-out traces (mean NLL per completion token,
the same code for all).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILL_SHARED_DATA", ROOT.parent / "shared" / "data"))
TRACES = SHARED / "traces" / "sky-t1-math-correct-5k-27b_math500.jsonl"
TOKENIZER = SHARED / "tokenizers" / "qwen2.5-instruct"
CONFIGS = ["distill-packed", "distill-padded", "trl-default", "trl-packed"]
LABELS = {
    "distill-packed": "distill (packed)",
    "distill-padded": "distill (padded, 2 per micro-batch)",
    "trl-default": "TRL SFTTrainer default (padded, 8 per batch)",
    "trl-packed": "TRL SFTTrainer packing='bfd' (padding-free)",
}
LR = 1e-3
BATCH = 8
SECTION = "## `distill train` vs TRL SFTTrainer (CPU)"


def prepare(workdir: Path, sequences: int, max_len: int) -> dict:
    """Tiny model + train/held-out data files in `workdir`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_len, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(workdir / "base")
    tokenizer.save_pretrained(workdir / "base")
    rows = []
    for line in TRACES.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["code"][0]}]
        length = len(tokenizer.apply_chat_template(messages, tokenize=False)) // 3  # cheap pre-filter by characters
        if length > 2 * max_len:
            continue
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_len - 8:  # a margin for the different renderings of the two trainers
            rows.append((messages, len(ids)))
        if len(rows) == sequences + 16:
            break
    train, held_out = rows[:sequences], rows[sequences:]
    with (workdir / "train.jsonl").open("w") as handle:
        for messages, _ in train:
            handle.write(json.dumps({"messages": messages}) + "\n")
    with (workdir / "trl_train.jsonl").open("w") as handle:
        for messages, _ in train:
            handle.write(json.dumps({"prompt": messages[:1], "completion": messages[1:]}) + "\n")
    with (workdir / "held_out.jsonl").open("w") as handle:
        for messages, _ in held_out:
            handle.write(json.dumps({"messages": messages}) + "\n")
    lengths = [n for _, n in train]
    return {"sequences": len(train), "tokens": sum(lengths), "mean_len": sum(lengths) / len(lengths), "max_len": max(lengths), "min_len": min(lengths)}


# --------------------------------------------------------------------------------------------
# workers (one process each)


def worker_distill(workdir: Path, name: str, max_len: int) -> dict:
    from distill.students.sft import TrainConfig, run

    out = workdir / name
    packed = name == "distill-packed"
    cfg = TrainConfig(
        student=str(workdir / "base"), data=str(workdir / "train.jsonl"), out=out, max_seq_len=max_len, global_batch=BATCH,
        epochs=1, lr=LR, schedule="constant", warmup_ratio=0.0, grad_clip=1.0, save_every=10**6,
        packing=packed, micro_batch_size=2,
    )  # fmt: skip
    run(cfg)
    return {**step_totals(out), "model_dir": str(out / "model")}


def step_totals(out: Path) -> dict:
    """Totals over the step records of a finished `distill train` run in `out`."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    tokens = sum(r["tokens"] for r in records)
    padded = sum(r["padding_fraction"] * r["tokens"] / (1 - r["padding_fraction"]) for r in records)
    return {
        "useful_tokens": tokens,
        "processed_tokens": tokens + padded,
        "seconds": sum(r["step_time_s"] for r in records),
        "cpu_seconds": sum(r["cpu_time_s"] for r in records),
        "steps": len(records),
        "micro_batches": sum(r["micro_batches"] for r in records),
        "final_loss": records[-1]["loss"],
    }


def worker_trl(workdir: Path, name: str, max_len: int, mean_len: float) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    packed = name == "trl-packed"
    per_device, accumulation = (1, rows_per_step(workdir, max_len)) if packed else (BATCH, 1)
    args = SFTConfig(
        output_dir=str(workdir / name), max_length=max_len, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=1,
        save_strategy="no", report_to=[], seed=42, packing=packed, dataloader_num_workers=0,
    )  # fmt: skip
    counts = {"useful": 0, "processed": 0}

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            counts["processed"] += ids.numel()
            counts["useful"] += int(mask.sum()) if mask is not None else ids.numel()
            return super().training_step(model, inputs, *rest, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(workdir / "base")
    model = AutoModelForCausalLM.from_pretrained(workdir / "base", attn_implementation="sdpa")
    dataset = datasets.load_dataset("json", data_files=str(workdir / "trl_train.jsonl"), split="train")
    trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(str(workdir / name / "model"))
    return {
        "useful_tokens": counts["useful"],
        "processed_tokens": counts["processed"],
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "model_dir": str(workdir / name / "model"),
        "per_device_batch": per_device,
        "accumulation": accumulation,
    }


def rows_per_step(workdir: Path, max_len: int) -> int:
    """Packed rows per optimizer step so that TRL's packed run takes as many steps as the others
    (BATCH sequences per step): rows of best-fit-decreasing packing / number of steps."""
    from transformers import AutoTokenizer

    from distill.students.data import _best_fit

    tokenizer = AutoTokenizer.from_pretrained(workdir / "base")
    lengths = []
    for line in (workdir / "trl_train.jsonl").read_text().splitlines():
        row = json.loads(line)
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    rows = len(_best_fit(sorted(range(len(lengths)), key=lambda i: -lengths[i]), lengths, max_len))
    return max(1, round(rows / -(-len(lengths) // BATCH)))


def held_out_loss(model_dir: str, held_out: Path) -> float:
    """Mean NLL per assistant token on the held-out traces, with the same code for every model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.students.chat import resolve_template
    from distill.students.data import encode, read_conversations, shifted_targets
    from distill.students.logprobs import token_logprobs

    tokenizer = AutoTokenizer.from_pretrained(held_out.parent / "base")
    template = resolve_template("model", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    conversations, _ = read_conversations(held_out)
    total, count = 0.0, 0
    with torch.no_grad():
        for conversation in conversations:
            example = encode(conversation.messages, tokenizer, template)
            ids = torch.from_numpy(example.input_ids.astype("int64"))[None]
            targets = torch.from_numpy(shifted_targets(example))[None]
            total -= float(token_logprobs(model, ids, None, targets).sum())
            count += int((targets != -100).sum())
    return total / count


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-sft-vs-trl")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section in a Markdown file")
    parser.add_argument("--rerun", nargs="+", choices=CONFIGS, help="run only these again, reusing --workdir's data and other results")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--mean-len", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.worker.startswith("distill"):
            result = worker_distill(args.workdir, args.worker, args.max_len)
        else:
            result = worker_trl(args.workdir, args.worker, args.max_len, args.mean_len)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        (args.workdir / f"{args.worker}.json").write_text(json.dumps(result, indent=2))
        return

    import shutil

    if args.rerun:
        data = json.loads((args.workdir / "data.json").read_text())
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        data = prepare(args.workdir, args.sequences, args.max_len)
        (args.workdir / "data.json").write_text(json.dumps(data))
    print(f"data: {data}", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS=str(args.threads))
    results = {}
    for name in CONFIGS:
        if not (args.rerun and name not in args.rerun):
            print(f"running {name} ...", file=sys.stderr)
            command = [sys.executable, __file__, "--worker", name, "--workdir", str(args.workdir), "--max-len", str(args.max_len),
                       "--threads", str(args.threads), "--mean-len", str(data["mean_len"])]  # fmt: skip
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        results[name] = json.loads((args.workdir / f"{name}.json").read_text())
        if "held_out_loss" not in results[name]:
            results[name]["held_out_loss"] = held_out_loss(results[name]["model_dir"], args.workdir / "held_out.jsonl")
            (args.workdir / f"{name}.json").write_text(json.dumps(results[name], indent=2))
    section = report(results, data, args)
    print(section)
    if args.write:
        replace_section(args.write, section)


def report(results: dict, data: dict, args) -> str:
    # CPU time of the training loop (all threads of the process): on a machine shared with other
    # jobs, wall time mostly measures the neighbours; CPU time measures the work done.
    base = results["trl-default"]["useful_tokens"] / results["trl-default"]["cpu_seconds"]
    best = results["trl-packed"]["useful_tokens"] / results["trl-packed"]["cpu_seconds"]
    lines = [
        SECTION,
        "",
        f"Command: `python bench/sft_vs_trl.py --sequences {args.sequences} --max-len {args.max_len} --threads {args.threads}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, {args.threads} torch threads, no GPU; "
        f"torch {_version('torch')}, transformers {_version('transformers')}, trl {_version('trl')}.  ",
        f"Data: {data['sequences']} Sky-T1 MATH-500 traces, {data['min_len']}-{data['max_len']} tokens (mean {data['mean_len']:.0f}), "
        f"{data['tokens']:,} tokens; 16 more held out. Model: 2-layer Qwen2, hidden 64, Qwen2.5 vocabulary (151,665).",
        "",
        "| trainer | steps | useful tokens per CPU-s | vs TRL default | vs TRL packed | useful tokens/s (wall) | padding | peak RSS (GB) | final train loss | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        r = results[name]
        rate = r["useful_tokens"] / r["cpu_seconds"]
        padding = 1 - r["useful_tokens"] / r["processed_tokens"]
        lines.append(
            f"| {LABELS[name]} | {r['steps']} | {rate:,.0f} | {rate / base:.2f}x | {rate / best:.2f}x | {r['useful_tokens'] / r['seconds']:,.0f} | "
            f"{padding:.0%} | {r['peak_rss_gb']:.2f} | {r['final_loss']:.3f} | {r['held_out_loss']:.3f} |"
        )
    lines += [
        "",
        "Useful tokens count non-padding tokens; per CPU-second uses the CPU time of the training loop (all threads; model loading",
        "and tokenization excluded), the fair measure on a shared machine; the wall-clock rate is shown too.",
        "Final train loss is the last step's (TRL logs the mean of its last step too); the held-out loss is the same",
        "measurement for every trained model. The data order differs between trainers (each shuffles its own way).",
        "",
    ]
    return "\n".join(lines)


def replace_section(path: Path, section: str) -> None:
    """Replace the section whose heading is `section`'s first line (or append it)."""
    title = section.splitlines()[0]
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()

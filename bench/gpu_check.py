"""The one prepared device check: `distill train`, `distill grpo` and `distill eval` on one GPU.

    python bench/gpu_check.py --json $OUT/gpu_check.json --write docs/benchmarks.md   # one CUDA GPU, <= 8 min
    python bench/gpu_check.py --dry-run                                               # every section, tiny, on CPU (< 1 min)

Written for the GPU machine this project can borrow (one H200, minutes at a time, no network:
torch, transformers, peft, accelerate; no vLLM, no flash-attn; liger-kernel only if a wheel was
brought along). docs/benchmarks.md ("GPU check") gives the exact command to run there.

Sections, in this order, under one time budget (--budget-s, default 420 s, so the whole check
ends within 8 minutes; a section that no longer fits is reported as skipped): 1, 2, 8 (the
tests, capped so that the figures after them keep two minutes), 3, 4, 5, 6, 7.
1. environment: device, versions, what is installed, the attention `auto` picks.
2. train: `distill train` on a Qwen2.5-1.5B-shaped student (random weights from its config),
   bf16 compute over fp32 weights, 16,384 packed tokens per micro-batch, no activation
   checkpointing (it fits in 141 GB; MFU counts 6N, so recomputation would only lower it):
   tokens/s, MFU, peak memory, median over the steps after the first. Target MFU >= 45%.
3. attention: packed-attention equality on the GPU (whole 1.5B model: per-token log-probs of a
   packed row against each sequence alone, bf16) and one attention layer of the 1.5B shape on
   16,384 packed tokens, forward + backward: sdpa_varlen (distill's default without flash-attn),
   flex_attention (compiled, document block mask) and SDPA under the full packed mask (the old
   path): time, and max difference to an fp32 per-sequence reference.
4. liger: liger-kernel's fused linear cross-entropy against distill's torch path
   (LinearCrossEntropy) and the checkpointed chunks, on 16,384 positions x the 151,936-token
   head: loss, peak memory, time (forward + backward), gradient agreement; "skipped: liger-kernel
   not installed" when it is not.
5. longest: the longest single sequence `distill train` fits (full fine-tuning, activation
   checkpointing): 65,536 tokens first, halving until one fits. Target 65,536.
6. grpo: one `distill grpo` step on the 1.5B shape with the hf engine (8 prompts x 8 completions
   x 256 tokens): rollout and update seconds.
7. eval: `distill eval --engine hf` on the 1.5B shape, 16 problems, 256 tokens: wall time and
   output tokens/s.
8. gpu tests: `pytest -m gpu tests/test_gpu.py` (bf16 vs fp32 loss, liger vs torch, FSDP2 over
   NCCL in one process, packed attention in bf16): each test's outcome.
The random-weight model never stops early, so every completion runs to its token cap and the
work is fixed. Problems are synthetic additions; their rewards do not matter for timing.

--dry-run runs every section at tiny size on the CPU (a 2-layer model; sections that need CUDA
say so) to check the script, not to measure: tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sft_gpu import QWEN_1_5B, SHARED, steps  # noqa: E402  (same folder: the shape and the metrics reader)

SECTION = "## GPU check (`bench/gpu_check.py`): train, grpo and eval on one GPU"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
WORDS = "the of a to in is that for it as with on be by this are we at from or an which one can all there their".split()
SIZES = {
    # GPU sizes and their dry-run counterparts
    "gpu": dict(tokens=16384, steps=4, global_batch=16, contexts=[65536, 32768, 16384], grpo=(8, 8, 256), eval=(16, 256), vocab=151936),
    "dry": dict(tokens=256, steps=2, global_batch=4, contexts=[256, 128], grpo=(2, 2, 8), eval=(2, 8), vocab=1024),
}
# Share of the budget each section may start with at least (seconds on the GPU); a section
# whose minimum no longer fits is skipped, and the tests, last, get whatever is left.
MINIMUM = {"train": 60, "attention": 30, "liger": 15, "longest": 60, "grpo": 60, "eval": 40, "gpu_tests": 45}
DISTILL_MODULES = ["typer", "yaml", "pyarrow", "numpy", "tqdm", "safetensors", "tokenizers", "psutil", "datasets", "math_verify", "httpx", "matplotlib"]


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.size = SIZES["dry" if self.dry else "gpu"]
        self.started = time.perf_counter()
        self.workdir = args.workdir
        self.results: dict = {}

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def cli(self, *argv: str, timeout: float) -> dict:
        """Run a distill command: in this process for the dry run (no start-up cost), in a child
        process on the GPU (an out-of-memory error cannot poison the next section)."""
        started = time.perf_counter()
        if self.dry:
            from distill.cli import main

            try:
                main(list(argv))
                code, error = 0, None
            except SystemExit as exit_:
                code, error = int(exit_.code or 0), None if not exit_.code else f"exit {exit_.code}"
            except Exception as exc:  # a crash is a finding, reported in its section
                code, error = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        else:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            try:
                done = subprocess.run([sys.executable, "-m", "distill.cli", *argv], env=env, capture_output=True, text=True, timeout=max(timeout, 1))
                code = done.returncode
                lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
                error = None if code == 0 else (lines[-1][:300] if lines else f"exit {code}")
                if code != 0 and any("OutOfMemoryError" in line or "out of memory" in line for line in lines):
                    error = "CUDA out of memory"
            except subprocess.TimeoutExpired:
                code, error = 124, f"timed out after {timeout:.0f} s"
        return {"ok": code == 0, "error": error, "seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------------
# inputs


def make_model(check: Check) -> Path:
    """The 1.5B shape (tiny for the dry run), random weights from a fixed seed, stored in bf16
    as the real checkpoint is, with the Qwen2.5 tokenizer (a character tokenizer without
    ../shared, and for the dry run: the 1.5B model's vocabulary is 151,936 either way)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = check.workdir / "model"
    if (out / "config.json").is_file():
        return out
    tokenizer_dir = SHARED / "tokenizers" / "qwen2.5-instruct"
    if (tokenizer_dir / "tokenizer.json").is_file() and not check.dry:
        tokenizer, tokenizer_name = AutoTokenizer.from_pretrained(tokenizer_dir), "Qwen2.5"
    else:
        import string

        from distill.chartok import build_char_tokenizer

        tokenizer = build_char_tokenizer(string.printable)
        tokenizer_name = "character" + ("" if check.dry else " (../shared/data absent)")
    shape = dict(TINY, vocab_size=len(tokenizer)) if check.dry else QWEN_1_5B
    config = Qwen2Config(**shape, max_position_embeddings=65536 + 1024, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    device = "cpu" if check.dry else "cuda"
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    check.results["environment"]["tokenizer"] = tokenizer_name
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def write_conversations(path: Path, count: int, words: tuple[int, int], seed: int = 0) -> Path:
    """`count` conversations of random common words (about one token each with Qwen2.5's)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": "Solve it."}, {"role": "assistant", "content": reply}]}) + "\n")
    return path


def write_problems(path: Path, count: int) -> Path:
    with path.open("w") as handle:
        for n in range(count):
            a, b = 3 + 7 * n, 11 + 5 * n
            handle.write(json.dumps({"id": f"add-{n}", "problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


COMMON_TRAIN = ["schedule=constant", "warmup_ratio=0", "save_every=1000000", "lr=1e-5", "chat_template=chatml"]


# --------------------------------------------------------------------------------------------
# sections


def environment(check: Check) -> dict:
    import torch
    import transformers

    from distill.students.attention import resolve_attention

    device = torch.device("cuda" if torch.cuda.is_available() and not check.dry else "cpu")

    def version(module: str) -> str | None:
        if importlib.util.find_spec(module) is None:
            return None
        try:
            from importlib.metadata import version as dist_version

            return dist_version({"liger_kernel": "liger-kernel", "flash_attn": "flash-attn"}.get(module, module))
        except Exception:
            return "installed"

    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores), dry run",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "installed": {name: version(name) for name in ("peft", "accelerate", "liger_kernel", "flash_attn", "vllm", "triton", "bitsandbytes")},
        "missing_distill_dependencies": [m for m in DISTILL_MODULES if importlib.util.find_spec(m) is None],
        "attention_auto": resolve_attention("auto", device),
        "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if device.type == "cuda" else None,
    }


def train(check: Check, model: Path) -> dict:
    size = check.size
    data = write_conversations(check.workdir / "train.jsonl", size["global_batch"] * size["steps"], (size["tokens"] // 16, size["tokens"] // 4))

    def attempt(out: Path, checkpointing: bool) -> dict:
        return check.cli("train", "--student", str(model), "--data", str(data), "--out", str(out), f"max_seq_len={size['tokens']}", "too_long=truncate",
                         f"micro_batch_tokens={size['tokens']}", f"global_batch={size['global_batch']}", f"max_steps={size['steps']}",
                         f"activation_checkpointing={str(checkpointing).lower()}", "check_memory=false", *COMMON_TRAIN,
                         timeout=min(check.remaining(), 240))  # fmt: skip  (check_memory=false: measure, do not estimate)

    out, checkpointing = check.workdir / "train", False
    run = attempt(out, checkpointing)
    if not run["ok"] and run["error"] == "CUDA out of memory":  # then measure with recomputation rather than nothing
        out, checkpointing = check.workdir / "train-checkpointed", True
        run = attempt(out, checkpointing)
    records = steps(out)[1:] or steps(out)  # the first step warms up kernels and the allocator
    if not run["ok"] or not records:
        return {"status": f"failed: {run['error']}", **run}
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    return {
        "status": "ok",
        "tokens_per_micro_batch": size["tokens"],
        "activation_checkpointing": checkpointing,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records),
        "steps_measured": len(records),
        "micro_batches_per_step": records[0]["micro_batches"],
        "loss_first_last": [steps(out)[0]["loss"], records[-1]["loss"]],
        "seconds": run["seconds"],
    }


def attention(check: Check, model_dir: Path) -> dict:
    """Equality of the packed path on this device, and one attention layer timed three ways."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from distill.students.attention import resolve_attention, varlen_attention
    from distill.students.logprobs import IGNORE, token_logprobs

    cuda = not check.dry
    device = torch.device("cuda" if cuda else "cpu")
    result: dict = {"status": "ok"}

    # (a) the whole model: a packed row against each sequence alone (bf16 autocast on GPU)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=resolve_attention("auto", device), dtype=torch.float32).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [1024, 700, 300, 2048] if cuda else [40, 25, 9]
    sequences = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).to(device) for n in lengths]
    input_ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    targets = torch.cat([torch.cat([s[1:], torch.tensor([IGNORE], device=device)]) for s in sequences])[None]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        packed = token_logprobs(model, input_ids, positions, targets)[0].float()
        alone = torch.cat([torch.cat([token_logprobs(model, s[None])[0, :-1], s.new_zeros(1, dtype=torch.float32)]) for s in sequences]).float()
    result["model_packed_vs_alone_max_abs_diff"] = float((packed - alone).abs().max())
    result["model_packed_vs_alone_mean_abs_diff"] = float((packed - alone).abs().mean())
    result["model_dtype"] = "bfloat16 autocast" if cuda else "float32"
    del model
    if cuda:
        torch.cuda.empty_cache()

    # (b) one attention layer of the model's shape on a packed row of `tokens` tokens
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    total = check.size["tokens"]
    rng = random.Random(0)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(total // 16, total // 3), total - sum(lengths)))
    dtype = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(1, heads, total, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    layer = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=True)
    segments = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])

    def reference():  # fp32, each sequence alone, GQA by repetition
        outputs = []
        for qs, ks, vs in zip(q.float().split(lengths, 2), k.float().split(lengths, 2), v.float().split(lengths, 2)):
            ks, vs = ks.repeat_interleave(heads // kv_heads, 1), vs.repeat_interleave(heads // kv_heads, 1)
            outputs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        return torch.cat(outputs, 2).transpose(1, 2)  # (1, T, H, D)

    def varlen(a, b, c):
        return varlen_attention(layer, a, b, c, None, position_ids=position_ids)[0]

    def masked(a, b, c):
        mask = (segments[:, None] == segments[None, :]) & torch.ones(total, total, dtype=torch.bool, device=device).tril()
        b, c = b.repeat_interleave(heads // kv_heads, 1), c.repeat_interleave(heads // kv_heads, 1)
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask[None, None]).transpose(1, 2)

    kernels = {"sdpa_varlen": varlen, "sdpa_full_mask": masked}
    if cuda:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document(b, h, q_idx, kv_idx):
            return (segments[q_idx] == segments[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(document, None, None, total, total, device=device)
        compiled = torch.compile(flex_attention)

        def flex(a, b, c):
            return compiled(a, b, c, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

        kernels["flex_attention"] = flex
    else:
        result["flex_attention"] = "skipped: torch has no flex_attention backward on CPU"
    expected = reference()
    layers = {}
    for name, kernel in kernels.items():
        try:
            inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
            output = kernel(*inputs)
            output.float().sum().backward()  # warm-up (and compilation for flex)
            times = []
            for _ in range(3):
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                output = kernel(*inputs)
                output.float().sum().backward()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            layers[name] = {"ms_forward_backward": round(statistics.median(times) * 1000, 2), "max_abs_diff_vs_fp32": float((output.float() - expected).abs().max())}
        except Exception as exc:  # e.g. a kernel this torch lacks: a finding, not a crash
            layers[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    result["layer"] = {"tokens": total, "sequences": len(lengths), "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""), **layers}
    return result


def liger(check: Check) -> dict:
    """The SFT loss head three ways on N positions x the 151,936-token vocabulary."""
    import torch

    from distill.students.logprobs import LinearCrossEntropy, _liger, logprobs_from_hidden

    cuda = not check.dry
    device = torch.device("cuda" if cuda else "cpu")
    hidden_size = TINY["hidden_size"] if check.dry else QWEN_1_5B["hidden_size"]
    positions, vocab = check.size["tokens"], check.size["vocab"]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=generator).to(device, torch.bfloat16 if cuda else torch.float32)
    targets = torch.randint(0, vocab, (positions,), generator=generator).to(device)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device)  # fp32 master weight, as trained
    with torch.no_grad():
        head.weight.copy_((torch.randn(vocab, hidden_size, generator=generator) * 0.02).to(device))

    def torch_path(h):
        return LinearCrossEntropy.apply(h, head.weight, None, targets, 1024)

    def chunked(h):
        return -logprobs_from_hidden(h[None], head, targets[None], 1024).sum()

    paths = {"torch (LinearCrossEntropy)": torch_path, "torch (checkpointed chunks)": chunked}
    fused = _liger(required=False) if cuda else None
    if fused is not None:
        paths["liger-kernel"] = lambda h: fused(h, head.weight.to(h.dtype), targets, bias=None, ignore_index=-100, reduction="sum")
    result: dict = {"status": "ok", "positions": positions, "vocab": vocab, "hidden": hidden_size}
    if fused is None:
        result["liger-kernel"] = "skipped: needs CUDA" if not cuda else "skipped: liger-kernel not installed"
    grads = {}
    for name, path in paths.items():
        try:
            times, peaks = [], []
            for _ in range(3):
                head.weight.grad = None
                h = hidden.clone().requires_grad_(True)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                started = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # as the training loop calls the loss
                    loss = path(h)
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                    peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
                times.append(time.perf_counter() - started)
            grads[name] = h.grad.float().flatten()
            result[name] = {"loss": float(loss), "ms_forward_backward": round(statistics.median(times[1:]) * 1000, 1),
                            "peak_extra_memory_gb": round(max(peaks), 2) if peaks else None}  # fmt: skip
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    base_name = "torch (LinearCrossEntropy)"
    for name, grad in grads.items():
        if name != base_name and base_name in grads:
            result[name]["grad_cosine_vs_torch"] = float(torch.nn.functional.cosine_similarity(grad, grads[base_name], dim=0))
            result[name]["loss_rel_diff_vs_torch"] = abs(result[name]["loss"] - result[base_name]["loss"]) / abs(result[base_name]["loss"])
    return result


def longest(check: Check, model: Path) -> dict:
    tries = []
    for length in check.size["contexts"]:
        if check.remaining() < MINIMUM["longest"] / (4 if check.dry else 1):
            tries.append({"tokens": length, "fits": None, "error": "skipped: time budget"})
            break
        data = write_conversations(check.workdir / f"context-{length}.jsonl", 2, (length, length))
        out = check.workdir / f"context-{length}"
        # check_memory=false: measure what fits rather than trust the estimate
        run = check.cli("train", "--student", str(model), "--data", str(data), "--out", str(out), f"max_seq_len={length}", "too_long=truncate",
                        "global_batch=1", "max_steps=1", "check_memory=false", "activation_checkpointing=true", *COMMON_TRAIN,
                        timeout=min(check.remaining(), 180))  # fmt: skip
        record = (steps(out) or [None])[0]
        fits = run["ok"] and record is not None
        tries.append({"tokens": length, "fits": fits, "peak_memory_gb": record["peak_memory_gb"] if record else None,
                      "tokens_per_s": record["tokens_per_s"] if record else None, "error": None if fits else run["error"], "seconds": run["seconds"]})  # fmt: skip
        if fits:
            break
    best = max((t["tokens"] for t in tries if t["fits"]), default=None)
    return {"status": "ok" if best else "failed: nothing fitted", "longest_tokens": best, "tries": tries}


def grpo(check: Check, model: Path) -> dict:
    prompts, group, max_tokens = check.size["grpo"]
    data = write_problems(check.workdir / "problems.jsonl", 64)
    out = check.workdir / "grpo"
    run = check.cli("grpo", "--student", str(model), "--data", str(data), "--out", str(out), "steps=1", f"prompts_per_step={prompts}",
                    f"group_size={group}", f"max_tokens={max_tokens}", "micro_batch_size=8", "engine=hf", "save_every=1000000",
                    "chat_template=chatml", timeout=min(check.remaining(), 240))  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "rollout_s" in r]
    if not run["ok"] or not rows:
        return {"status": f"failed: {run['error']}", **run}
    row = rows[0]
    return {"status": "ok", "prompts": prompts, "group_size": group, "max_tokens": max_tokens, "rollout_s": row["rollout_s"], "update_s": row["update_s"],
            "completion_tokens": row.get("completion_length", 0) * row.get("completions", 0), "peak_memory_gb": row.get("peak_memory_gb"),
            "seconds_with_load_and_export": run["seconds"]}  # fmt: skip


def evaluate(check: Check, model: Path) -> dict:
    problems, max_tokens = check.size["eval"]
    data = write_problems(check.workdir / "eval.jsonl", problems)
    out = check.workdir / "eval"
    run = check.cli("eval", "--model", str(model), "--benchmarks", f"additions={data}", "--engine", "hf", "--k", "1", "--max-tokens", str(max_tokens),
                    "--out", str(out), f"hf.batch_size={problems}", timeout=min(check.remaining(), 180))  # fmt: skip
    if not run["ok"] or not (out / "metrics.json").is_file():
        return {"status": f"failed: {run['error']}", **run}
    metrics = json.loads((out / "metrics.json").read_text())
    wall = metrics.get("generation_wall_time_s") or run["seconds"]
    tokens = _output_tokens(out)
    return {"status": "ok", "problems": problems, "max_tokens": max_tokens, "generation_wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall if wall else None, "seconds_with_load": run["seconds"],
            "engine": metrics.get("environment", {}).get("engine"), "dtype": metrics.get("environment", {}).get("dtype")}  # fmt: skip


def _output_tokens(out: Path) -> int:
    total = 0
    for path in (out / "samples").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            total += int(row.get("completion_tokens") or row.get("output_tokens") or 0)
    return total


def gpu_tests(check: Check) -> dict:
    """`pytest -m gpu tests/test_gpu.py`; the dry run only collects them (they skip without CUDA)."""
    started = time.perf_counter()
    if check.dry:  # in this process: no second start-up of torch
        import contextlib
        import io

        import pytest

        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = pytest.main(["-m", "gpu", str(ROOT / "tests" / "test_gpu.py"), "-q", "-p", "no:cacheprovider", "--collect-only", f"--rootdir={ROOT}"])
        collected = [line for line in captured.getvalue().splitlines() if "::" in line]
        return {"status": "ok" if code == 0 and collected else f"failed: exit {code}", "collected": collected, "seconds": round(time.perf_counter() - started, 1)}
    report = check.workdir / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", str(ROOT / "tests" / "test_gpu.py"), "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(min(check.remaining() - 120, 180), 30), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "failed: timed out", "seconds": round(time.perf_counter() - started, 1)}
    outcomes = _junit(report) if report.is_file() else {}
    failed = [name for name, outcome in outcomes.items() if outcome.startswith("failed")]
    return {"status": "ok" if done.returncode == 0 else f"failed: {len(failed)} tests", "tests": outcomes, "summary": (done.stdout.strip().splitlines() or [""])[-1],
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def _junit(path: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ElementTree

    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            outcomes[name] = "failed: " + (node.get("message") or "")[:200]
        elif skipped is not None:
            outcomes[name] = "skipped: " + (skipped.get("message") or "")[:200]
        else:
            outcomes[name] = "passed"
    return outcomes


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every section at tiny size on the CPU (checks the script, measures nothing)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="cpu = --dry-run")
    parser.add_argument("--workdir", type=Path, default=None, help="models and runs (default runs/gpu-check, or a temporary folder for the dry run)")
    parser.add_argument("--json", type=Path, default=None, help="where the results go (default WORKDIR/gpu_check.json)")
    parser.add_argument("--write", type=Path, help="replace the GPU check section of this Markdown file (GPU runs only)")
    parser.add_argument("--budget-s", type=float, default=None, help="time for all sections (default 420 on the GPU; 300 for the dry run, which takes about 30 s on 2 idle cores)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default all)")
    args = parser.parse_args()
    args.dry_run = args.dry_run or args.device == "cpu"
    if args.budget_s is None:
        args.budget_s = 300.0 if args.dry_run else 420.0
    import tempfile

    import torch

    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick CUDA when they see it
        torch.set_num_threads(min(2, torch.get_num_threads()))
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU; --dry-run runs every section at tiny size on the CPU")
    temporary = tempfile.TemporaryDirectory() if args.dry_run and args.workdir is None else None
    args.workdir = Path(temporary.name) if temporary else (args.workdir or ROOT / "runs" / "gpu-check")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.json = args.json or args.workdir / "gpu_check.json"
    only = set(args.only.split(",")) if args.only else None

    check = Check(args)
    check.results["environment"] = environment(check)
    print(f"gpu check: {check.results['environment']['device']}; budget {args.budget_s:.0f} s", file=sys.stderr)
    model = make_model(check)
    # the figures the issue asks first, then the GPU tests (correctness), then the rest
    sections = [("train", lambda: train(check, model)), ("gpu_tests", lambda: gpu_tests(check)), ("attention", lambda: attention(check, model)),
                ("liger", lambda: liger(check)), ("longest", lambda: longest(check, model)), ("grpo", lambda: grpo(check, model)),
                ("eval", lambda: evaluate(check, model))]  # fmt: skip
    for name, section in sections:
        if only and name not in only:
            continue
        minimum = MINIMUM[name] / (10 if args.dry_run else 1)
        if check.remaining() < minimum:
            check.results[name] = {"status": f"skipped: time budget ({check.remaining():.0f} s left, needs {MINIMUM[name]} s)"}
            continue
        print(f"gpu check: {name} ({check.remaining():.0f} s left) ...", file=sys.stderr)
        started = time.perf_counter()
        try:
            check.results[name] = section()
        except Exception as exc:  # one broken section must not cost the figures of the others
            check.results[name] = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                                   "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        check.results[name].setdefault("section_seconds", round(time.perf_counter() - started, 1))
        if not args.dry_run:
            torch.cuda.empty_cache()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_document(check), indent=2))  # after every section: a crash keeps what was measured
    document = _document(check)
    args.json.write_text(json.dumps(document, indent=2))
    section = report(document)
    print(section)
    if args.write:
        if args.dry_run:
            print(f"not writing {args.write}: a dry run measures nothing", file=sys.stderr)
        else:
            from sft_vs_trl import replace_section

            replace_section(args.write, section)
    if temporary:
        temporary.cleanup()


def _document(check: Check) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "dry_run": check.dry,
        "total_seconds": round(time.perf_counter() - check.started, 1),
        **check.results,
    }


def report(document: dict) -> str:
    """The docs/benchmarks.md section, from the JSON alone."""
    env = document["environment"]

    def section(name: str) -> dict:
        return document.get(name) or {"status": "not run"}

    def figure(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    train_, attention_, liger_, longest_, grpo_, eval_, tests = (section(n) for n in ("train", "attention", "liger", "longest", "grpo", "eval", "gpu_tests"))
    mfu = train_.get("mfu")
    lines = [
        SECTION,
        "",
        ("**Dry run on CPU: checks the script, measures nothing.**  " if document["dry_run"] else "") + f"Command: `{document['command']}`  ",
        f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}; "
        f"attention `auto` -> {env['attention_auto']}; liger-kernel {env['installed'].get('liger_kernel') or 'not installed'}; "
        f"flash-attn {env['installed'].get('flash_attn') or 'not installed'}; {document['date'][:10]}; whole check {document['total_seconds']:.0f} s.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| train: tokens/s at {train_.get('tokens_per_micro_batch', 0):,} packed tokens per micro-batch (1.5B shape, bf16) | {figure(train_.get('tokens_per_s'), ',.0f')} | |",
        f"| train: MFU | {figure(mfu, '.1%')} | >= 45% |",
        f"| train: peak memory (GB) | {figure(train_.get('peak_memory_gb'), '.1f')} | |",
        f"| train: longest single sequence that fits (activation checkpointing) | {figure(longest_.get('longest_tokens'), ',')} | 65,536 |",
        f"| packed vs one by one, whole model: max / mean abs diff of per-token log-probs | {figure(attention_.get('model_packed_vs_alone_max_abs_diff'), '.4f')} / {figure(attention_.get('model_packed_vs_alone_mean_abs_diff'), '.5f')} | bf16 noise |",
        f"| grpo step (hf engine, {grpo_.get('prompts', '-')} x {grpo_.get('group_size', '-')} x {grpo_.get('max_tokens', '-')} tokens): rollout / update (s) | {figure(grpo_.get('rollout_s'), '.1f')} / {figure(grpo_.get('update_s'), '.1f')} | |",
        f"| eval (hf engine, {eval_.get('problems', '-')} problems x {eval_.get('max_tokens', '-')} tokens): output tokens/s | {figure(eval_.get('output_tokens_per_s'), ',.0f')} | |",
        "",
        "Section status: " + "; ".join(f"{n} {section(n).get('status', '?')}" for n in ("train", "attention", "liger", "longest", "grpo", "eval", "gpu_tests")) + ".",
        "",
    ]
    layer = attention_.get("layer")
    if layer:
        lines += [f"One attention layer, {layer['tokens']:,} packed tokens in {layer['sequences']} sequences, {layer['heads']} heads ({layer['kv_heads']} KV), "
                  f"head dim {layer['head_dim']}, {layer['dtype']}, forward + backward:", "",
                  "| kernel | ms | max abs diff vs fp32 per-sequence reference |", "|---|---|---|"]  # fmt: skip
        for name in ("sdpa_varlen", "flex_attention", "sdpa_full_mask"):
            entry = layer.get(name)
            if entry is None:
                lines.append(f"| {name} | {attention_.get(name, 'not run')} | |")
            elif "error" in entry:
                lines.append(f"| {name} | failed: {entry['error']} | |")
            else:
                lines.append(f"| {name} | {entry['ms_forward_backward']:.2f} | {entry['max_abs_diff_vs_fp32']:.2e} |")
        lines.append("")
    if liger_.get("positions"):
        lines += [f"Loss head, {liger_['positions']:,} positions x {liger_['vocab']:,} vocabulary (hidden {liger_['hidden']}), forward + backward:", "",
                  "| path | loss | ms | peak extra memory (GB) | grad cosine vs torch |", "|---|---|---|---|---|"]  # fmt: skip
        for name in ("torch (LinearCrossEntropy)", "torch (checkpointed chunks)", "liger-kernel"):
            entry = liger_.get(name)
            if isinstance(entry, str):
                lines.append(f"| {name} | {entry} | | | |")
            elif isinstance(entry, dict) and "error" in entry:
                lines.append(f"| {name} | failed: {entry['error']} | | | |")
            elif isinstance(entry, dict):
                lines.append(f"| {name} | {entry['loss']:.2f} | {entry['ms_forward_backward']:.1f} | {figure(entry.get('peak_extra_memory_gb'), '.2f')} | {figure(entry.get('grad_cosine_vs_torch'), '.5f')} |")
        lines.append("")
    if longest_.get("tries"):
        lines.append("Longest sequence tries: " + "; ".join(
            f"{t['tokens']:,} {'fits' if t['fits'] else 'does not fit' if t['fits'] is False else 'not tried'}"
            + (f" ({figure(t.get('peak_memory_gb'), '.1f')} GB)" if t["fits"] else f" ({t['error']})" if t.get("error") else "")
            for t in longest_["tries"]) + ".")  # fmt: skip
        lines.append("")
    if tests.get("tests"):
        lines.append("GPU tests: " + "; ".join(f"{name} {outcome}" for name, outcome in tests["tests"].items()) + ".")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

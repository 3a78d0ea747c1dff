"""The cost of logit distillation's loss: cross-entropy alone vs cross-entropy + top-k forward KL.

    python bench/kd_loss.py [--tokens 2048] [--hidden 1536] [--vocab 151936] [--k 20] [--repeats 3] [--write]

Times forward + backward of the LM-head loss over `tokens` positions of a Qwen2.5-1.5B-shaped
head (hidden 1536, vocabulary 151,936), on random hidden states and teacher top-k:
- `LinearCrossEntropy` (what `distill train` runs with kd_alpha=0 on CPU and on GPUs without
  liger): gradients computed chunk by chunk in the forward, three vocabulary matmuls per token;
- `LinearCrossEntropyKD` (kd_alpha>0): CE and KD from the same chunk of logits, gradients
  computed in the forward, three matmuls plus the KD rows' tempered softmax;
- `ce_kd_from_hidden` (fused_loss=chunked, softcapped heads): checkpointed chunks, four matmuls;
and the peak memory each adds (tracemalloc does not see torch's allocator: the figure is the
process's peak RSS growth, measured in a fresh subprocess per method). `--write` puts the
section into docs/benchmarks.md. Any KD implementation that materialised full (T, V) logits
would need tokens x vocab x 4 bytes for them alone (1.2 GB at 2048 x 151,936).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(method: str, tokens: int, hidden: int, vocab: int, k: int, repeats: int, chunk: int) -> dict:
    import resource

    import torch

    from distill.students.data import KDBatch
    from distill.students.logprobs import LinearCrossEntropy, LinearCrossEntropyKD, _kd_slots, ce_kd_from_hidden

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(1, tokens, hidden) * 0.5
    targets = torch.randint(0, vocab, (1, tokens))
    kd = KDBatch(torch.arange(tokens), torch.randint(0, vocab, (tokens, k)), torch.log_softmax(torch.randn(tokens, k), -1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        head.zero_grad()
        hidden_states = states.clone().requires_grad_(True)
        started, cpu_started = time.perf_counter(), time.process_time()
        if method == "ce":
            loss = LinearCrossEntropy.apply(hidden_states[0], head.weight, None, targets[0], chunk)
        elif method == "ce+kd":
            slots = _kd_slots(targets, torch.arange(tokens), kd)
            loss = LinearCrossEntropyKD.apply(hidden_states[0], head.weight, None, targets[0], slots, kd.ids, kd.logprobs, 1.0, 0.5, 0.5, chunk)[0]
        else:
            both = ce_kd_from_hidden(hidden_states, head, targets, kd, 1.0, chunk)
            loss = both[0] * 0.5 + both[1] * 0.5
        loss.backward()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "seconds": min(times[1:]), "cpu_seconds": min(cpu_times[1:]), "peak_rss_growth_mb": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1536)  # Qwen2.5-1.5B's head
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one method in this process, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.hidden, args.vocab, args.k, args.repeats, args.chunk)))
        return
    results = {}
    for method in ("ce", "ce+kd", "ce+kd checkpointed"):
        command = [sys.executable, __file__, "--one", method, *sys.argv[1:]]
        command = [c for c in command if c != "--write"]
        output = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        results[method] = json.loads(output.strip().splitlines()[-1])
        print(results[method])
    # CPU time: what the loss costs, less swayed than wall time by other jobs on shared cores.
    ratio = results["ce+kd"]["cpu_seconds"] / results["ce"]["cpu_seconds"]
    print(f"ce+kd / ce: {ratio:.2f}x CPU time")
    if args.write:
        import torch

        sys.path.insert(0, str(ROOT / "bench"))
        from sft_vs_trl import replace_section

        command = "python bench/kd_loss.py " + " ".join(a for a in sys.argv[1:])
        section = "\n".join([
            "## Logit distillation's loss: CE alone vs CE + top-k KL (`bench/kd_loss.py`)",
            "",
            f"`{command.strip()}`, {date.today().isoformat()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(shared with other jobs at the time), torch {torch.__version__}, one process. Forward + backward of the LM-head loss over "
            f"{args.tokens} positions, hidden {args.hidden}, vocabulary {args.vocab:,}, k={args.k}, chunks of {args.chunk}; best of {args.repeats}.",
            "",
            "| loss | CPU seconds | wall seconds | peak RSS growth (MB) |",
            "|---|---:|---:|---:|",
            *(f"| {name} | {r['cpu_seconds']:.2f} | {r['seconds']:.2f} | {r['peak_rss_growth_mb']:.0f} |" for name, r in results.items()),
            "",
            f"CE + KD (what `distill train kd_alpha>0` runs) takes {ratio:.2f}x the CPU time of CE alone: the same three vocabulary "
            "matmuls per token, plus a tempered softmax over the vocabulary at every position with top-k (here all of them). The "
            f"checkpointed form recomputes each chunk's logits in the backward ({results['ce+kd checkpointed']['cpu_seconds'] / results['ce']['cpu_seconds']:.2f}x). "
            f"None materialises the (T, V) logits ({args.tokens * args.vocab * 4 / 2**30:.2f} GiB in fp32 here, about 20 GB for one 32k-token sequence). "
            f"Ratios are by CPU time: wall time was {results['ce']['seconds'] / results['ce']['cpu_seconds']:.0f}x the CPU time, the cores being held by other jobs.",
            "",
        ])  # fmt: skip
        replace_section(ROOT / "docs" / "benchmarks.md", section)


if __name__ == "__main__":
    main()

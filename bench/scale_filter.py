"""`distill filter` at scale: wall time and peak resident memory (workers included) against rows.

    python bench/scale_filter.py --rows 100000 1000000 [--workers 2] [--keep DIR] [--write docs/benchmarks.md]

Synthetic traces, written once per size into a temporary directory (or --keep DIR, reused when
present): 4 samples per problem; each problem a 25-word text with numbers (1% exact copies of an
earlier problem, so dedup has work); each completion about 1.2 kB (`<think>` reasoning, then a
boxed answer): 85% correct, 8% wrong, 3% without an answer, 2% truncated (finish_reason length),
2% with a broken format. About 124 MB of JSONL per 100k rows, as in the issue that asked for this
benchmark.

Each size runs `distill filter --in TRACES --out OUT` in a fresh process with the default
settings (verifier workers, dedup, decontamination against the five benchmarks from
../shared/data/eval, plots). Peak memory is the largest sum of the resident set sizes of the
process and all its children (the verifier's workers), sampled every 50 ms, so it is what the
machine must hold. CPU time (user + system, the filter and its workers) is reported beside wall
time: on shared cores it is the figure that shows whether time grows linearly with rows. No peer: the figure to meet is the issue's (1M rows in at most 1.5 GB, time
linear in rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## `distill filter` at scale (`bench/scale_filter.py`)"
WORDS = ("apple river stone cloud garden number circle triangle square seven prime even odd sum product "
         "distance speed train water tank paint fence ladder angle radius volume price discount ticket "
         "marble coin dice card chess robot window bridge tower").split()


def write_traces(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` synthetic trace records (the minimal form plus finish_reason) as JSONL."""
    rng = random.Random(seed)
    problems: list[tuple[str, int]] = []
    with path.open("w", encoding="utf-8") as handle:
        for row in range(rows):
            if row % 4 == 0:
                if problems and rng.random() < 0.01:
                    text, answer = problems[rng.randrange(len(problems))]  # an exact copy of an earlier problem
                else:
                    numbers = [rng.randint(2, 999) for _ in range(3)]
                    words = " ".join(rng.choice(WORDS) for _ in range(19))
                    text = f"Problem {row // 4}: {words} {numbers[0]} and {numbers[1]} with {numbers[2]}. What is the total?"
                    answer = sum(numbers)
                    problems.append((text, answer))
                problem_id = f"p{row // 4}"
            kind = rng.random()
            steps = " ".join(f"Step {k}: add {rng.randint(1, 99)} to the running total, then check it against the {rng.choice(WORDS)}." for k in range(14))
            final = answer if kind < 0.85 else answer + 1
            completion = f"<think>\nLet me work through this carefully. {steps}\nSo the total is {final}.\n</think>\n\nThe answer is \\boxed{{{final}}}."
            finish = "stop"
            if 0.93 <= kind < 0.96:
                completion = completion.rsplit("\\boxed", 1)[0] + "I am not sure."
            elif 0.96 <= kind < 0.98:
                completion, finish = completion[: len(completion) // 2], "length"
            elif kind >= 0.98:
                completion = completion.replace("</think>", "")
            record = {"id": problem_id, "sample_idx": row % 4, "problem": text, "answer": str(answer), "completion": completion, "finish_reason": finish}
            handle.write(json.dumps(record) + "\n")


def tree_rss(pid: int) -> int:
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_filter(traces: Path, out: Path, workers: int | None, data_dir: Path) -> dict:
    command = [sys.executable, "-m", "distill.cli", "filter", "--in", str(traces), "--out", str(out), f"data_dir={data_dir}"]
    if workers:
        command.append(f"verifier_workers={workers}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree: workers are reaped by the filter
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"distill filter failed ({process.returncode}):\n{err[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": peak / 2**30, "accepted": metrics["accepted"], "rows": metrics["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=None, help="verifier workers (default: one per core)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the synthetic traces here (reused when present)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="../shared/data (benchmarks to decontaminate against)")
    parser.add_argument("--write", type=Path, default=None, help="append the section to this Markdown file")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="scale-filter-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        traces = folder / f"traces-{rows}.jsonl"
        if not traces.is_file():
            write_traces(traces, rows)
        size_mb = traces.stat().st_size / 1e6
        result = run_filter(traces, folder / f"out-{rows}", args.workers, args.data / "eval")
        result.update(size_mb=size_mb)
        results.append(result)
        print(f"{rows:>9,} rows ({size_mb:,.0f} MB): {result['wall_s']:.1f} s ({result['cpu_s']:.1f} s CPU), peak {result['peak_rss_gb']:.2f} GB, accepted {result['accepted']:,}", file=sys.stderr)

    load = os.getloadavg()[0]
    lines = [
        SECTION,
        "",
        f"`python bench/scale_filter.py --rows {' '.join(str(r) for r in args.rows)}"
        + (f" --workers {args.workers}" if args.workers else "")
        + f"` on {platform.machine()} with {os.cpu_count()} cores (Python {platform.python_version()}), {date.today()}; "
        f"load average {load:.1f} at the end (other jobs shared the cores when it is above 0).",
        "",
        "| rows | JSONL | wall time | CPU time, workers included | CPU µs per row | peak RSS, workers included | accepted |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rows, result in zip(args.rows, results):
        lines.append(f"| {rows:,} | {result['size_mb']:,.0f} MB | {result['wall_s']:.1f} s | {result['cpu_s']:.1f} s | {result['cpu_s'] / rows * 1e6:.0f} | "
                     f"{result['peak_rss_gb']:.2f} GB | {result['accepted']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with args.write.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()

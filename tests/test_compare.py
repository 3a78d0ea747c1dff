"""`distill compare` on three small run directories: table, significance, cost lineage, plots,
and the refusal to compare runs evaluated under different protocols."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from distill.benchmarks import Benchmark
from distill.compare import CompareConfig, lineage, run
from distill.config import save_config
from distill.errors import ConfigError
from distill.evaluate import EvalConfig, compute_metrics, protocol_of, samples_path
from distill.problems import Problem
from distill.records import TraceRecord, TraceWriter
from distill.rundir import write_json

PROBLEMS = tuple(Problem(f"p{i}", f"What is {i} + 1?", str(i + 1), "toy") for i in range(24))


def make_stage_run(path: Path, stage: str, config: dict, metrics: dict) -> Path:
    """A finished run directory of another stage, as its files look: config.yaml + metrics.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    write_json(path / "metrics.json", {"stage": stage, **metrics})
    return path


def make_eval_run(path: Path, model: str, accuracy: float, *, k: int = 4, seed: int = 0, **settings) -> Path:
    """An eval run directory written with eval's own file helpers; each sample is right with
    probability `accuracy` (per-problem skill drawn around it), lengths vary with the model."""
    cfg = EvalConfig(model=model, benchmarks=("toy",), out=path, k=k, **settings)
    benchmark = Benchmark("toy", "toy.jsonl", 4, PROBLEMS)
    protocol = protocol_of(cfg, [benchmark])
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    write_json(path / "protocol.json", protocol)
    rng = random.Random(seed)
    records = []
    for problem in PROBLEMS:
        skill = min(1.0, max(0.0, rng.gauss(accuracy, 0.2)))
        for idx in range(k):
            correct = rng.random() < skill
            answer = problem.answer if correct else str(rng.randint(100, 103))
            records.append(TraceRecord(
                problem_id=problem.id, sample_idx=idx, problem=problem.problem, answer=problem.answer,
                completion=f"<think>hm</think> \\boxed{{{answer}}}", source="toy", finish_reason="stop",
                completion_tokens=int(rng.gauss(300 * (1 + accuracy), 40)), seed=idx,
                extra={"correct": correct, "extracted": answer, "verdict": "correct" if correct else "wrong", "format_ok": True},
            ))
    with TraceWriter(samples_path(path, "toy")) as writer:
        writer.write(records)
    metrics = compute_metrics(path, protocol)
    write_json(path / "metrics.json", {"stage": "eval", **metrics, "environment": {"engine": "hf", "engine_version": "5", "dtype": "auto"}})
    return path


@pytest.fixture
def three_runs(tmp_path):
    generate = make_stage_run(tmp_path / "gen", "generate", {"teacher": "big"}, {"gpu_hours": 10.0, "completion_tokens": 5_000_000})
    (generate / "traces.jsonl").write_text("")
    train = make_stage_run(tmp_path / "sft", "train", {"data": str(generate / "traces.jsonl")}, {"gpu_hours": 4.0, "train_tokens": 2_000_000})
    grpo = make_stage_run(tmp_path / "grpo", "grpo", {"model": "Qwen/base"}, {"gpu_hours": 30.0, "train_tokens": 9_000_000})
    for run_dir in (train, grpo):
        (run_dir / "model").mkdir()
    base = make_eval_run(tmp_path / "eval-base", "Qwen/base", 0.2, seed=1)
    sft = make_eval_run(tmp_path / "eval-sft", str(train / "model"), 0.8, seed=2)
    rl = make_eval_run(tmp_path / "eval-grpo", str(grpo / "model"), 0.35, seed=3)
    return tmp_path, base, sft, rl


def test_compare_three_runs(three_runs):
    root, base, sft, rl = three_runs
    assert set(lineage(sft)) == {"train", "generate"} and set(lineage(rl)) == {"grpo"} and lineage(base) == {}
    summary = run(CompareConfig(runs=(base, sft, rl), baseline=base, out=root / "report"))
    rows = {row["label"]: row for row in summary["rows"]}
    assert summary["baseline"] == "eval-base" and summary["benchmarks"] == ["toy"]
    sft_cell, rl_cell = rows["eval-sft"]["benchmarks"]["toy"], rows["eval-grpo"]["benchmarks"]["toy"]
    assert sft_cell["vs_baseline"]["p_value"] < 0.01 and sft_cell["vs_baseline"]["difference"] > 0.3
    assert rl_cell["vs_baseline"]["problems"] == len(PROBLEMS)
    assert "vs_baseline" not in rows["eval-base"]["benchmarks"]["toy"]
    assert rows["eval-sft"]["cost"]["gpu_hours"] == 14.0  # generate + train
    assert rows["eval-sft"]["cost"]["teacher_tokens"] == 5_000_000 and rows["eval-sft"]["cost"]["train_tokens"] == 2_000_000
    assert rows["eval-grpo"]["cost"]["gpu_hours"] == 30.0 and rows["eval-grpo"]["cost"]["teacher_tokens"] is None
    assert rows["eval-base"]["cost"]["gpu_hours"] is None

    report = (root / "report" / "report.md").read_text()
    assert "| eval-sft |" in report and "14.00 GPU-h" in report and "5.00M" in report and "(p=" in report
    # the summary comes first: one row per model, pass@1 [CI] per benchmark, one cost column;
    # the details (Δ with p-values, cons@k, pass@k, lengths) come after it
    tables = [line for line in report.splitlines() if line.startswith("| model |")]
    assert tables[0] == "| model | toy | cost to make | training FLOPs |"
    summary_rows = report.split(tables[0])[1].split("\n\n")[0].splitlines()[2:]
    assert [row.split(" | ")[0] for row in summary_rows] == ["| **eval-base**", "| eval-sft", "| eval-grpo"]
    low, high = sft_cell["pass@1_ci95"]
    # these runs predate the compute ledger and name no weights on this machine: FLOPs unknown, "-" with a footnote
    assert summary_rows[1] == f"| eval-sft | {100 * sft_cell['pass@1']:.1f} [{100 * low:.1f}, {100 * high:.1f}] ▲ | 14.00 GPU-h | - |"
    assert summary_rows[0].endswith("| — | 0 |"), "the base cost nothing"
    assert "`-` unknown: no parameter count" in report
    assert report.index("| model | toy | cost to make | training FLOPs |") < report.index("## Per benchmark") < report.index("(p=")
    assert summary["summary_table"] == "\n".join([tables[0], "|---|---:|---:|---:|", *summary_rows])
    with (root / "report" / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["model"] for r in table] == ["eval-base", "eval-sft", "eval-grpo"]
    assert float(table[1]["toy_pass@1"]) == pytest.approx(sft_cell["pass@1"])
    assert float(table[1]["toy_pass@1_ci_low"]) < float(table[1]["toy_pass@1"]) < float(table[1]["toy_pass@1_ci_high"])
    for name in ("accuracy.png", "lengths.png", "compute.png", "accuracy_vs_compute.png"):
        data = (root / "report" / name).read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


def test_protocol_mismatch_is_refused_unless_allowed(three_runs, run_cli):
    root, base, sft, _ = three_runs
    hot = make_eval_run(root / "eval-hot", "Qwen/base", 0.2, temperature=1.0, k=8, seed=4)
    short = make_eval_run(root / "eval-short", "Qwen/base", 0.2, max_tokens=1024, seed=5)
    with pytest.raises(ConfigError) as refused:
        run(CompareConfig(runs=(base, hot, short), out=root / "refused"))
    message = str(refused.value)
    assert "toy: k differs (eval-base=4, eval-hot=8, eval-short=4)" in message
    assert "temperature differs" in message and "max_tokens differs" in message
    assert "--allow-protocol-mismatch" in message and "\n" not in message
    assert not (root / "refused" / "report.md").exists()
    # the verifier's no-answer rule is part of the protocol: it changes pass@1
    strict = make_eval_run(root / "eval-strict", "Qwen/base", 0.2, no_answer_fallback="none", seed=6)
    with pytest.raises(ConfigError, match="toy: no_answer_fallback differs \\(eval-base=last, eval-strict=none\\)"):
        run(CompareConfig(runs=(base, strict), out=root / "refused-strict"))

    code, _, err = run_cli("compare", str(base), str(hot), str(sft), "--allow-protocol-mismatch", "--out", str(root / "allowed"))
    assert code == 0, err
    summary = json.loads((root / "allowed" / "metrics.json").read_text())
    assert {m["setting"] for m in summary["mismatches"]} == {"k", "temperature"}
    assert all(row["benchmarks"]["toy"]["mismatch"] for row in summary["rows"])
    report = (root / "allowed" / "report.md").read_text()
    assert "†" in report and "## Protocol differences" in report


def test_compare_cli_and_errors(three_runs, run_cli):
    root, base, sft, rl = three_runs
    code, out, err = run_cli("compare", str(base), str(sft), "--out", str(root / "cli"), "seed=1")
    assert code == 0, err
    assert (root / "cli" / "report.md").is_file()
    assert out.splitlines()[0] == "| model | toy | cost to make | training FLOPs |", "the summary table is the result printed"
    assert err.splitlines()[0].startswith("distill compare: 2 eval runs (eval-base, eval-sft) on toy, baseline eval-base")
    assert err.splitlines()[1] == "  command line: seed=1"
    code, _, err = run_cli("compare", str(root / "gen"), "--out", str(root / "x"))
    assert code == 2 and "is a `distill eval` run directory" in err and "Traceback" not in err

"""The `distill` command line: a thin layer over importable stages.

Each command loads its recipe, applies flags and key=value overrides, and calls the stage's
`run(cfg)`; the stage modules are imported inside the command so `distill --help` stays fast
and needs neither torch nor any GPU library. Errors the user can fix (DistillError) print one
line and exit non-zero; anything else keeps its traceback because it is a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from distill.errors import DistillError

app = typer.Typer(
    name="distill",
    help="Distil long chain-of-thought reasoning into small students, and compare them with an RL-only baseline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RECIPE = typer.Option(None, "--recipe", help="Recipe YAML; holds only what differs from the defaults.")
OVERRIDES = typer.Argument(None, help="key=value overrides, type-checked like the recipe (e.g. temperature=0.7).", show_default=False)
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, "--model", help="Teacher: hub id or path (hf, vllm) or the served model name (openai)."),
    data: Optional[str] = typer.Option(None, "--data", help="Problems: JSONL/Parquet/CSV, a preset (math500, gsm8k, openr1-math, ...) or a hub dataset org/name, org/name:config@split."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (rerun the same command to resume)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm, openai or hf (default: vllm)."),
    n: Optional[int] = typer.Option(None, "--n", help="Samples per problem (default: 4)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Max new tokens per sample (default: 32768)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature; 0 = greedy (default: 0.6)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (default: 0.95)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed; each sample's seed derives from it (default: 0)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N (0-based): this machine's share of the problems."),
    on_bad_row: Optional[str] = typer.Option(None, "--on-bad-row", help="error or skip (default: error)."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Sample long chain-of-thought traces from a teacher for a set of problems.

    Reads problems (JSONL/Parquet/CSV or a hub dataset); writes RUN_DIR/traces*.jsonl
    (append-only, resumable), config.yaml, metrics.jsonl and metrics.json.
    """
    from distill.config import load_config
    from distill.teacher.generate import GenerateConfig, run

    flags = dict(model=model, data=data, out=out, engine=engine, n=n, max_tokens=max_tokens, temperature=temperature,
                 top_p=top_p, seed=seed, shard=shard, on_bad_row=on_bad_row)
    loaded = load_config(GenerateConfig, recipe=recipe, flags=flags, overrides=overrides or [])
    metrics = _run(run, loaded)
    typer.echo(f"{metrics['samples']} samples in {Path(loaded.config.out) / metrics['trace_file']} "
               f"({metrics['problems_complete']}/{metrics['problems']} problems complete)")


@app.command(name="filter", context_settings=_PASS_THROUGH)
def filter_(
    traces: Optional[Path] = typer.Option(None, "--in", "--traces", help="A generate run directory, or a JSONL/Parquet with problem, answer, completion."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to write."),
    student: Optional[str] = typer.Option(None, "--student", help="Student preset or tokenizer (dir or hub id): reject conversations longer than its max_seq_len."),
    on_bad_row: Optional[str] = typer.Option(None, "--on-bad-row", help="error (default) or skip: count malformed rows and go on."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Keep the traces worth learning from: verified correct, well formed, not truncated, one language, no loops, not contaminated.

    Reads a generate run directory or any JSONL/Parquet with problem, answer, completion; writes
    RUN_DIR/accepted.parquet, rejected.parquet, stats.json, report.md and plots.
    """
    from distill.config import load_config
    from distill.teacher.filter import FilterConfig, run

    flags = {"traces": traces, "out": out, "student": student, "on_bad_row": on_bad_row}
    loaded = load_config(FilterConfig, recipe=recipe, flags=flags, overrides=overrides or [])
    metrics = _run(run, loaded)
    typer.echo(f"accepted {metrics['accepted']}/{metrics['rows']} traces -> {loaded.config.out / 'accepted.parquet'}")


@app.command(context_settings=_PASS_THROUGH)
def train(
    student: Optional[str] = typer.Option(None, "--student", help="Preset (qwen-1.5b, qwen-7b, qwen-14b, qwen-32b, llama-8b, llama-70b), hub id or local model directory."),
    data: Optional[str] = typer.Option(None, "--data", help="Parquet/JSONL with chat `messages` (or problem + completion), or a `distill filter` run directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory; rerunning the same command resumes from its last checkpoint."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Fine-tune a student (e.g. --student qwen-7b) on accepted traces; under torchrun on many GPUs.

    Reads a Parquet/JSONL with chat `messages` (or problem + completion); writes a Hugging Face
    model directory, checkpoints, config.yaml, metrics.jsonl and metrics.json into RUN_DIR.
    """
    from distill.students.sft import load_train_config, run

    loaded = load_train_config(recipe=recipe, flags={"student": student, "data": data, "out": out}, overrides=overrides or [])
    metrics = _run(run, loaded)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(metrics["model_dir"])


@app.command(context_settings=_PASS_THROUGH)
def grpo(
    student: Optional[str] = typer.Option(None, "--student", help="Student preset (qwen-1.5b, ...) or model path / hub id."),
    data: Optional[str] = typer.Option(None, "--data", help="Problems with reference answers: JSONL/Parquet/CSV, a preset (gsm8k-train) or a hub dataset."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (an existing one is resumed)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="grpo | dr_grpo | dapo (default grpo)."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Train an RL-only baseline (GRPO, Dr. GRPO, DAPO) from the same base, rewarded by the shared verifier.

    Reads problems with reference answers; writes a Hugging Face model directory, checkpoints,
    config.yaml, metrics.jsonl and metrics.json into RUN_DIR.
    """
    from distill.students.grpo import load_grpo_config, run

    flags = {"student": student, "data": data, "out": out, "variant": variant}
    loaded = load_grpo_config(recipe=recipe, flags=flags, overrides=overrides or [])
    metrics = _run(run, loaded)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(metrics["model_dir"])


@app.command(context_settings=_PASS_THROUGH)
def onpolicy(
    student: Optional[str] = typer.Option(None, "--student", help="Student preset, model directory (e.g. a distill train run's model) or hub id."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: hub id or model directory with the student's tokenizer (a served name with teacher_engine=openai)."),
    data: Optional[str] = typer.Option(None, "--data", help="Problems: JSONL/Parquet/CSV, a preset (gsm8k-train) or a hub dataset; answers only needed with reward_weight > 0."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (an existing one is resumed)."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """On-policy distillation: the student samples, the teacher scores each sampled token (reverse KL), grpo's loop updates.

    Reads problems; writes a Hugging Face model directory, checkpoints, config.yaml,
    metrics.jsonl (reverse KL to the teacher per step) and metrics.json into RUN_DIR.
    """
    from distill.students.onpolicy import load_onpolicy_config, run

    flags = {"student": student, "teacher": teacher, "data": data, "out": out}
    loaded = load_onpolicy_config(recipe=recipe, flags=flags, overrides=overrides or [])
    metrics = _run(run, loaded)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(metrics["model_dir"])


@app.command(name="eval", context_settings=_PASS_THROUGH)
def eval_(
    model: Optional[str] = typer.Option(None, "--model", help="Model to evaluate: a hub id or a model directory."),
    benchmarks: Optional[str] = typer.Option(None, "--benchmarks", help="Comma-separated: gsm8k, math500, aime24, aime25, amc23, or JSONL files (NAME=FILE)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (an interrupted eval resumes in it)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm | openai | hf."),
    k: Optional[int] = typer.Option(None, "--k", help="Samples per problem (default per benchmark: AIME 64, AMC 32, MATH-500 4, GSM8K 1)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Maximum new tokens per sample (default 32768)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems of each benchmark."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local benchmark copies (../shared/data/eval layout)."),
    rescore: Optional[Path] = typer.Option(None, "--rescore", help="Re-grade the stored generations of this run directory; generate nothing."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Evaluate a model on math benchmarks under one locked, recorded protocol.

    Reads a model and benchmarks (gsm8k, math500, aime24, aime25, amc23 or a JSONL); writes every
    generation and verdict (JSONL) and metrics.json with pass@1, cons@k, pass@k and 95% CIs.
    """
    from distill.config import load_config
    from distill.evaluate import EvalConfig, run

    names = tuple(b.strip() for b in benchmarks.split(",") if b.strip()) if benchmarks is not None else None
    flags = dict(model=model, benchmarks=names, out=out, engine=engine, k=k, max_tokens=max_tokens, limit=limit,
                 data_dir=data_dir, rescore=rescore)
    loaded = load_config(EvalConfig, recipe=recipe, flags=flags, overrides=overrides or [])
    _run(run, loaded)


@app.command(context_settings=_PASS_THROUGH)
def compare(
    runs: Optional[List[str]] = typer.Argument(None, help="Eval run directories (and train/grpo/generate ones), then key=value overrides.", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The eval run the others are compared to (default: the first)."),
    allow_protocol_mismatch: bool = typer.Option(False, "--allow-protocol-mismatch", help="Compare runs evaluated under different protocols; the table marks them."),
    recipe: Optional[Path] = RECIPE,
) -> None:
    """Compare base, distilled and RL-only runs: table with CIs and significance, cost, lengths, plots.

    Reads eval/train/grpo/generate run directories (their files only); writes report.md,
    report.csv and PNG plots into REPORT_DIR.
    """
    from distill.compare import CompareConfig, run
    from distill.config import load_config

    # A trailing key=value is an override unless a directory of that name exists.
    items = runs or []
    overrides = [item for item in items if "=" in item and not Path(item).exists()]
    paths = tuple(Path(item) for item in items if item not in overrides) or None
    flags = dict(runs=paths, out=out, baseline=baseline, allow_protocol_mismatch=allow_protocol_mismatch or None)
    loaded = load_config(CompareConfig, recipe=recipe, flags=flags, overrides=overrides)
    summary = _run(run, loaded)
    typer.echo(summary["summary_table"])


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the demo's run directories (default runs/demo, with --quick runs/demo-quick)."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: the same six steps in about 70 seconds on 2 CPU cores."),
    engine: Optional[str] = typer.Option(None, "--engine", help="hf or vllm: teacher sampling, RL rollouts and evals (default: hf)."),
    recipe: Optional[Path] = RECIPE,
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Run the whole pipeline on the embedded toy world, on CPU: generate, filter, train, grpo, eval, compare.

    Writes one run directory per stage under --out, the comparison report (report.md, plots) and
    its summary (metrics.json); prints the table. Rerunning resumes; other settings need another --out.
    """
    from distill.toy.demo import load_demo_config, run

    loaded = load_demo_config(quick=quick, out=out, recipe=recipe, overrides=overrides or [], engine=engine)
    run(loaded.config, loaded.sources)


@app.command()
def doctor() -> None:
    """Print the versions of Python, torch, CUDA and the libraries each command needs, and what is missing."""
    from distill.doctor import report

    typer.echo(report())


def _run(run, loaded):
    """The stage's run(config, sources); a run refused before it started leaves no run directory."""
    from distill.rundir import removed_if_refused

    with removed_if_refused(getattr(loaded.config, "out", None)):
        return run(loaded.config, loaded.sources)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: one-line errors for problems the user can fix."""
    try:
        app(args=argv, prog_name="distill")
    except DistillError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; finished work is kept and the same command resumes it", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

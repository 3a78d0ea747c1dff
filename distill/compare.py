"""`distill compare`: base vs distilled vs RL-only, from their run directories' files alone.

    distill compare runs/eval-base runs/eval-sft runs/eval-grpo --baseline runs/eval-base --out runs/report

Writes into REPORT_DIR:
    report.md     one row per model, one column group per benchmark: pass@1 with its 95% CI,
                  cons@k, the difference to the baseline with a paired significance test over
                  problems; then training cost (GPU- or CPU-hours, training tokens, teacher tokens
                  generated) and mean response length; the protocol and each run's environment
    report.csv    the same figures, one row per model, flat columns
    accuracy.png  pass@1 per benchmark with 95% CI error bars
    lengths.png   response-length distributions (tokens) per benchmark and model
    compute.png   pass@1 against training compute (hours to produce the model)
    accuracy_vs_compute.png
                  pass@1 against training FLOPs (the compute ledger, distill.compute; log scale,
                  the base at the left edge)
    config.yaml, metrics.json (the table as data), compare.log

What is read, and from where (no stage's code is called; only files):
- eval runs (`distill eval` run directories): metrics.json, protocol.json, samples/*.jsonl
  (per-problem scores for the paired test, lengths for the plot), config.yaml (the model).
- cost: the runs an evaluated model came from are found by following paths in config files:
  the eval's `model` lies in (or is) a train/grpo run directory; that run's config names its
  data, which lies in a filter or generate run directory, and so on. Run directories given on the
  command line that are not evaluations are linked the same way (and reported if unlinked).
  The teacher's own lineage is not followed (a teacher made by distill train is not part of its
  student's cost). From their metrics.json: `gpu_hours` / `cpu_hours` (else `wall_time_s`, shown
  as wall hours) and the `compute` block (distill.compute: tokens and estimated FLOPs; runs from
  before it are estimated from `train_tokens` / `completion_tokens` and their step records,
  marked "~", or shown as "-" when a model's parameter count cannot be found).

The protocol check: runs whose protocol differs on a shared benchmark (k, temperature, top_p,
max tokens, prompt: system prompt and instruction, the problem set: `--limit`, or the
verifier's no_answer_fallback) are refused,
naming the difference, unless `allow_protocol_mismatch`; then the cells are marked and the
paired test uses the problems both runs scored.

Statistics (`distill.metrics`): the paired test is a sign-flip permutation test on per-problem
pass@1 differences (two-sided), with a paired bootstrap 95% CI of the difference.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from distill.compute import human, ledger_of, run_metrics, training_flops
from distill.errors import ConfigError, InputError
from distill.evaluate import PROTOCOL_FILE, read_protocol, read_samples
from distill.metrics import Sample, paired_test, per_problem_scores
from distill.rundir import CONFIG_FILE, METRICS_FILE, RunDir

# Keys of hours read from the metrics.json of train / grpo / generate runs, first found wins
# (tokens and FLOPs come from the compute ledger: distill.compute.ledger_of).
COST_KEYS = {
    "gpu_hours": ("gpu_hours",),
    "cpu_hours": ("cpu_hours",),
}
TRAINING_STAGES = ("train", "grpo", "onpolicy")
MADE_BY = ("generate", "filter", *TRAINING_STAGES)  # the stages whose cost is part of a model's
# Config keys naming a model that takes part in a run without being what the run makes: the
# teacher (what it cost to make the teacher is not this student's cost) and filter's tokenizer.
NOT_UPSTREAM = {"generate": ("model",), "filter": ("student",)}
PROTOCOL_KEYS = ("k", "temperature", "top_p", "max_tokens", "prompt", "problem_set", "no_answer_fallback")


@dataclass(frozen=True)
class CompareConfig:
    runs: tuple[Path, ...] = ()  # eval run directories (rows), and optionally train/grpo/generate runs
    out: Path | None = None  # the report directory
    baseline: Path | None = None  # the eval run the others are compared to; default: the first
    allow_protocol_mismatch: bool = False  # put runs with different protocols side by side, marked
    benchmarks: tuple[str, ...] | None = None  # only these; default: every benchmark of the runs
    seed: int = 0  # of the bootstrap and permutation draws


@dataclass
class Row:
    """One evaluated model and what it cost."""

    path: Path
    label: str
    model: str
    metrics: dict[str, Any]
    protocol: dict[str, Any]
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # benchmark -> graded samples (protocol's problems)
    lineage: dict[str, list[Path]] = field(default_factory=dict)  # stage -> run dirs it came from
    cost: dict[str, float | None] = field(default_factory=dict)


def run(cfg: CompareConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    if not cfg.runs:
        raise ConfigError("no run directories to compare: pass RUN_DIR... (eval run directories)")
    if cfg.out is None:
        raise ConfigError("missing required value 'out': pass --out REPORT_DIR")

    # ---- read the runs ----------------------------------------------------------------------------
    paths = [Path(p) for p in cfg.runs]
    if cfg.baseline is not None and Path(cfg.baseline).resolve() not in [p.resolve() for p in paths]:
        paths.insert(0, Path(cfg.baseline))
    for path in paths:
        if not path.is_dir():
            raise InputError(f"{path}: not a directory; pass run directories made by distill")
    eval_paths = [p for p in paths if (p / PROTOCOL_FILE).is_file()]
    other_paths = [p for p in paths if p not in eval_paths]
    if not eval_paths:
        raise InputError(f"none of {', '.join(map(str, paths))} is a `distill eval` run directory (no {PROTOCOL_FILE})")
    rows = [_read_row(path) for path in eval_paths]
    _unique_labels(rows)
    baseline = rows[0] if cfg.baseline is None else next(r for r in rows if r.path.resolve() == Path(cfg.baseline).resolve())

    # ---- cost, by following the runs' config files --------------------------------------------------
    unlinked = []
    for row in rows:
        row.lineage = lineage(row.path)
        row.cost = cost_of(row.lineage)
    linked = {p.resolve() for row in rows for ps in row.lineage.values() for p in ps}
    for path in other_paths:
        if not run_metrics(path):
            raise InputError(f"{path}: neither an eval run ({PROTOCOL_FILE}) nor a finished run directory ({METRICS_FILE})")
        if path.resolve() not in linked:
            unlinked.append(path)

    # ---- the protocol check ---------------------------------------------------------------------------
    benchmarks = list(cfg.benchmarks) if cfg.benchmarks else _benchmarks_of(rows)
    mismatches = protocol_mismatches(rows, benchmarks)
    if mismatches and not cfg.allow_protocol_mismatch:
        raise ConfigError(
            "the runs were evaluated under different protocols: " + "; ".join(m["text"] for m in mismatches)
            + ". Evaluate them under one protocol, or pass --allow-protocol-mismatch to compare anyway (the table marks it)"
        )
    marked = {(m["benchmark"], label) for m in mismatches for label in m["labels"]}

    # ---- figures per row and benchmark -------------------------------------------------------------
    table = []
    for row in rows:
        entry: dict[str, Any] = {"label": row.label, "run": str(row.path), "model": row.model, "benchmarks": {}, "cost": row.cost,
                                 "eval_flops": (ledger_of(row.path) or {}).get("flops_total")}  # inference: not part of the cost
        for name in benchmarks:
            figures = row.metrics.get("benchmarks", {}).get(name)
            if figures is None:
                continue
            cell = {key: figures.get(key) for key in ("pass@1", "pass@1_ci95", "pass@1_se", "cons@k", "k", "pass@k", "response_tokens_mean", "truncation_rate", "format_failure_rate", "problems")}
            cell["mismatch"] = (name, row.label) in marked
            if row is not baseline and name in baseline.metrics.get("benchmarks", {}):
                cell["vs_baseline"] = _paired(row, baseline, name, cfg.seed)
            entry["benchmarks"][name] = cell
        lengths = [l for name in benchmarks for l in _lengths(row, name)]
        entry["response_tokens_mean"] = sum(lengths) / len(lengths) if lengths else None
        table.append(entry)

    # ---- write the report ------------------------------------------------------------------------------
    out = RunDir(cfg.out, "compare", cfg, sources)
    out.announce(f"distill compare: {len(rows)} eval runs ({', '.join(r.label for r in rows)}) on {', '.join(benchmarks)}, "
                 f"baseline {baseline.label} -> {out.path}", shown=("runs", "out", "baseline"))
    _write_markdown(out.file("report.md"), table, rows, benchmarks, baseline, mismatches, unlinked)
    _write_csv(out.file("report.csv"), table, benchmarks)
    plots = write_plots(out.path, table, rows, benchmarks)
    summary = {"baseline": baseline.label, "benchmarks": benchmarks, "rows": table, "mismatches": mismatches,
               "unlinked_runs": [str(p) for p in unlinked], "plots": plots,
               "summary_table": "\n".join(summary_table(table, benchmarks, baseline))}
    out.write_metrics(summary)
    out.say(f"done: report {out.file('report.md')} (summary first, then per benchmark, cost, protocol), report.csv, {', '.join(plots)}")
    return summary


# --------------------------------------------------------------------------------------------
# reading


def _read_row(path: Path) -> Row:
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        raise InputError(f"{metrics_path}: not found; the eval in {path} has not finished (run the same `distill eval` again to resume it)")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    config = _read_yaml(path / CONFIG_FILE)
    protocol = read_protocol(path)
    samples = {name: read_samples(path, name, spec["problem_ids"]) for name, spec in protocol.get("benchmarks", {}).items()}
    return Row(path=path, label=config.get("name") or path.name, model=str(config.get("model") or "?"), metrics=metrics,
               protocol=protocol, samples=samples)


def _unique_labels(rows: list[Row]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        if row.label in seen:
            row.label = f"{row.path.parent.name}/{row.path.name}" if row.path.parent.name else f"{row.label}-{seen[row.label]}"
        seen[row.label] = seen.get(row.label, 0) + 1


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _benchmarks_of(rows: list[Row]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [n for n in row.metrics.get("benchmarks", {}) if n not in names]
    return names


def run_dir_of(path: Path, depth: int = 3) -> Path | None:
    """The distill run directory holding `path` (itself or one of its parents): the first with
    both config.yaml and metrics.json (or a sharded generate run's metrics.shard-I-of-N.json)."""
    path = Path(path)
    for candidate in [path, *list(path.parents)[:depth]]:
        if (candidate / CONFIG_FILE).is_file() and run_metrics(candidate):
            return candidate
    return None


def _stage_of(run_path: Path) -> str | None:
    return run_metrics(run_path).get("stage")


def lineage(eval_path: Path) -> dict[str, list[Path]]:
    """The run directories an evaluated model came from, by stage, found by following every
    path-valued string (one with a separator or a file suffix) in each run's config.yaml (the
    model, the data, the traces), except those naming a teacher (`teacher`, `teacher_*`, generate's `model`) or filter's tokenizer."""
    found: dict[str, list[Path]] = {}
    seen = {eval_path.resolve()}
    frontier = [eval_path]
    while frontier:
        current = frontier.pop()
        config, skipped = _read_yaml(current / CONFIG_FILE), NOT_UPSTREAM.get(_stage_of(current) or "", ())
        upstream = {k: v for k, v in config.items() if k not in skipped and k != "teacher" and not str(k).startswith("teacher_")}
        for value in _strings(upstream):
            if "/" not in value and os.sep not in value and not Path(value).suffix:
                # a bare word is a setting, not a path, even where a directory has its name
                # (onpolicy's `variant: grpo` beside the demo's grpo/ run)
                continue
            for candidate in (Path(value), current.parent / value):
                try:
                    exists = candidate.exists()
                except OSError:
                    exists = False
                if not exists:
                    continue
                origin = run_dir_of(candidate)
                if origin is None or origin.resolve() in seen:
                    break
                seen.add(origin.resolve())
                stage = _stage_of(origin)
                if stage in MADE_BY:  # not eval, compare, or the demo's directory that holds them all
                    found.setdefault(stage, []).append(origin)
                    frontier.append(origin)
                break
    return found


def _strings(data: Any) -> list[str]:
    if isinstance(data, str):
        return [data] if data and len(data) < 4096 and "\n" not in data else []
    if isinstance(data, Mapping):
        return [s for value in data.values() for s in _strings(value)]
    if isinstance(data, list):
        return [s for value in data for s in _strings(value)]
    return []


def _first(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for scope in (metrics, metrics.get("cost") if isinstance(metrics.get("cost"), Mapping) else {}):
        for key in keys:
            value = scope.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def cost_of(found: Mapping[str, list[Path]]) -> dict[str, Any]:
    """Hours, tokens and FLOPs it took to make the model: teacher generation plus training (SFT,
    RL, on-policy distillation), from each run's metrics.json and its compute ledger
    (distill.compute.ledger_of: the run's `compute` block, or an estimate for older runs).
    Tokens and hours are None where no run of that kind was found; FLOPs are 0 for a base model
    (nothing made it here) and None when a run's are unknown (`flops_unknown` names it)."""
    cost: dict[str, Any] = {"gpu_hours": None, "cpu_hours": None, "wall_hours": None, "train_tokens": None, "teacher_tokens": None,
                            "teacher_tokens_scored": None, "student_tokens_generated": None, "flops": 0.0,
                            "flops_estimated": [], "flops_unknown": []}  # fmt: skip

    def add(key: str, value: float | None) -> None:
        if value is not None:
            cost[key] = (cost[key] or 0.0) + value

    for stage, paths in found.items():
        for path in paths:
            metrics = run_metrics(path)
            gpu, cpu = _first(metrics, COST_KEYS["gpu_hours"]), _first(metrics, COST_KEYS["cpu_hours"])
            add("gpu_hours", gpu)
            add("cpu_hours", cpu)
            if gpu is None and cpu is None and isinstance(metrics.get("wall_time_s"), (int, float)):
                add("wall_hours", metrics["wall_time_s"] / 3600)
            ledger = ledger_of(path) or {}
            if stage in TRAINING_STAGES:
                add("train_tokens", ledger.get("student_tokens_trained"))
                add("student_tokens_generated", ledger.get("student_tokens_generated") or None)
                add("teacher_tokens_scored", ledger.get("teacher_tokens_scored") or None)
            if stage == "generate":
                add("teacher_tokens", ledger.get("teacher_tokens_generated"))
            flops = training_flops(ledger)
            if flops is None:
                cost["flops_unknown"].append(str(path))
            elif cost["flops"] is not None:
                cost["flops"] += flops
            if ledger.get("estimated") and flops:
                cost["flops_estimated"].append(str(path))
    if cost["flops_unknown"]:
        cost["flops"] = None  # never a partial sum shown as the whole
    return cost


def compute_hours(cost: Mapping[str, float | None]) -> float:
    """The x of the accuracy-vs-compute plot: every hour spent, whatever the device."""
    return sum(v or 0.0 for k, v in cost.items() if k in ("gpu_hours", "cpu_hours", "wall_hours"))


# --------------------------------------------------------------------------------------------
# protocol and statistics


def _protocol_values(row: Row, name: str) -> dict[str, Any] | None:
    bench = row.protocol.get("benchmarks", {}).get(name)
    if bench is None:
        return None
    return {
        "k": bench.get("k"),
        "temperature": row.protocol.get("temperature"),
        "top_p": row.protocol.get("top_p"),
        "max_tokens": row.protocol.get("max_tokens"),
        "prompt": (row.protocol.get("system_prompt"), row.protocol.get("instruction")),
        "problem_set": bench.get("problem_set"),
        # How a completion with no box and no "answer is" is graded changes pass@1; runs from
        # before the option existed graded such completions as no answer ("none").
        "no_answer_fallback": row.protocol.get("no_answer_fallback", "none"),
    }


def protocol_mismatches(rows: list[Row], benchmarks: list[str]) -> list[dict[str, Any]]:
    """One entry per (benchmark, setting) on which the runs that share the benchmark differ."""
    mismatches = []
    for name in benchmarks:
        values = [(row, v) for row in rows if (v := _protocol_values(row, name)) is not None]
        for key in PROTOCOL_KEYS:
            distinct = {json.dumps(v[key]) for _, v in values}
            if len(distinct) > 1:
                shown = ", ".join(f"{row.label}={_show(key, v[key])}" for row, v in values)
                mismatches.append({"benchmark": name, "setting": key, "labels": [row.label for row, _ in values],
                                   "text": f"{name}: {key} differs ({shown})"})
    return mismatches


def _show(key: str, value: Any) -> str:
    if key == "prompt":
        system, instruction = value
        return json.dumps({"system": system, "instruction": instruction})[:80]
    return str(value)


def _paired(row: Row, baseline: Row, name: str, seed: int) -> dict[str, Any]:
    """Per-problem pass@1 of both runs on the problems both scored, and the paired test."""
    scored = set(row.protocol["benchmarks"].get(name, {}).get("problem_ids", []))
    ids = [pid for pid in baseline.protocol["benchmarks"][name]["problem_ids"] if pid in scored]
    shared = set(ids)
    mine = per_problem_scores(s for s in row.samples.get(name, []) if s.problem_id in shared)
    theirs = per_problem_scores(s for s in baseline.samples.get(name, []) if s.problem_id in shared)
    common = [pid for pid in ids if pid in mine and pid in theirs]
    if not common:
        return {"difference": None, "p_value": None, "problems": 0}
    return paired_test([mine[p]["pass@1"] for p in common], [theirs[p]["pass@1"] for p in common], seed=seed)


def _lengths(row: Row, name: str) -> list[int]:
    return [s.completion_tokens for s in row.samples.get(name, [])]


# --------------------------------------------------------------------------------------------
# writing


def _percent(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.{digits}f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.{digits}f}k"
    return f"{value:.{digits}f}"


def _hours_text(cost: Mapping[str, float | None]) -> str:
    """GPU-hours, CPU-hours or wall time it took to make the model; under an hour in minutes."""
    parts = []
    for key, unit in (("gpu_hours", "GPU"), ("cpu_hours", "CPU"), ("wall_hours", "wall")):
        hours = cost.get(key)
        if not hours:
            continue
        if unit == "GPU" and hours >= 1:
            parts.append(f"{_number(hours)} GPU-h")
        elif hours >= 1:
            parts.append(f"{_number(hours)} h {unit}" if unit == "wall" else f"{_number(hours)} {unit}-h")
        else:
            parts.append(f"{60 * hours:.1f} min {unit}" if unit == "wall" else f"{60 * hours:.1f} {unit}-min")
    return ", ".join(parts) or "—"


def _cost_label(label: str, cost: Mapping[str, float | None]) -> str:
    spent = _hours_text(cost)
    return f"{label} ({spent})" if spent != "—" else f"{label} (no training recorded)"


def _significance(test: Mapping[str, Any] | None) -> str:
    if not test or test.get("difference") is None:
        return "—"
    stars = "**" if test["p_value"] < 0.01 else "*" if test["p_value"] < 0.05 else ""
    return f"{100 * test['difference']:+.1f} (p={test['p_value']:.3g}){stars}"


def _arrow(test: Mapping[str, Any] | None) -> str:
    """▲ / ▼: a difference to the baseline significant at p < 0.05; nothing otherwise."""
    if not test or test.get("difference") is None or test.get("p_value") is None or test["p_value"] >= 0.05:
        return ""
    return " ▲" if test["difference"] > 0 else " ▼"


def _pass_at_1(cell: Mapping[str, Any]) -> str:
    low, high = cell.get("pass@1_ci95") or (None, None)
    return f"{_percent(cell['pass@1'])} [{_percent(low)}, {_percent(high)}]{' †' if cell['mismatch'] else ''}"


def summary_table(table, benchmarks, baseline: Row) -> list[str]:
    """The report's first table, also printed by `distill compare` and `distill demo`: one row per
    model, pass@1 per benchmark with its 95% CI, the hours and the FLOPs it took to make it."""
    header = ["model", *benchmarks, "cost to make", "training FLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for entry in table:
        cells = [f"**{entry['label']}**" if entry["label"] == baseline.label else entry["label"]]
        for name in benchmarks:
            cell = entry["benchmarks"].get(name)
            cells.append("—" if cell is None else _pass_at_1(cell) + _arrow(cell.get("vs_baseline")))
        cells.append(_hours_text(entry["cost"]))
        cells.append(_flops_text(entry["cost"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _flops_text(cost: Mapping[str, Any]) -> str:
    """Training FLOPs, human-readable: "~" where estimated from a run without a ledger, "-" unknown."""
    return ("~" if cost.get("flops_estimated") and cost.get("flops") else "") + human(cost.get("flops"))


def _flops_notes(table) -> list[str]:
    """The footnotes the FLOP column needs: which runs were estimated, which are unknown."""
    notes = []
    estimated = sorted({p for entry in table for p in entry["cost"].get("flops_estimated", [])})
    unknown = sorted({p for entry in table for p in entry["cost"].get("flops_unknown", [])})
    if estimated:
        notes.append("`~` estimated from runs made before the compute ledger (their prompt tokens and extra passes were not "
                     "recorded): " + ", ".join(estimated))
    if unknown:
        notes.append("`-` unknown: no parameter count for a model these runs used (weights not on this machine; for a served teacher "
                     "set `model_params`): " + ", ".join(unknown))
    return notes


def _write_markdown(path: Path, table, rows: list[Row], benchmarks, baseline: Row, mismatches, unlinked) -> None:
    """Summary first (one row per model), then per-benchmark details, cost, protocol and runs."""
    lines = [
        "# distill compare",
        "",
        f"pass@1 in percent with its 95% CI, per benchmark; baseline **{baseline.label}** ({baseline.model}). "
        "▲ / ▼: better / worse than the baseline (paired permutation test over problems, p < 0.05). "
        "Cost: the compute spent making the model (teacher generation and training; details below): hours as recorded, and "
        "training FLOPs estimated by the compute ledger (2N per token forward, 6N per token trained; docs/architecture.md)."
        + (" † marks a result evaluated under another protocol than the other runs'." if mismatches else ""),
        "",
        *summary_table(table, benchmarks, baseline),
        "",
        *([f"{note}  " for note in _flops_notes(table)] + [""] if _flops_notes(table) else []),
        "![pass@1 per benchmark with 95% CIs](accuracy.png)",
        "",
        "![pass@1 against the training FLOPs that made each model](accuracy_vs_compute.png)",
        "",
    ]
    if mismatches:
        lines += ["## Protocol differences (compared anyway: --allow-protocol-mismatch)", ""]
        lines += [f"- {m['text']}" for m in mismatches] + [""]

    # ---- per benchmark: everything measured, one small table each ------------------------------------
    lines += ["## Per benchmark", "",
              f"Δ: pass@1 minus the baseline's, in points, with the p-value of a paired sign-flip permutation test over problems "
              "(* p<0.05, ** p<0.01). cons@k: majority vote over the k samples; pass@k: any of the k correct.", ""]
    for name in benchmarks:
        spec = next((r.protocol["benchmarks"][name] for r in rows if name in r.protocol.get("benchmarks", {})), None)
        about = f" ({spec['problems']} problems, k={spec['k']})" if spec else ""
        lines += [f"### {name}{about}", "",
                  f"| model | pass@1 [95% CI] | Δ vs {baseline.label} | cons@k | pass@k | mean response tokens | truncated | format failures |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for entry in table:
            cell = entry["benchmarks"].get(name)
            if cell is None:
                continue
            delta = "baseline" if entry["label"] == baseline.label else _significance(cell.get("vs_baseline"))
            lines.append(
                f"| {entry['label']} | {_pass_at_1(cell)} | {delta} | {_percent(cell['cons@k'])} | {_percent(cell.get('pass@k'))} "
                f"| {_number(cell.get('response_tokens_mean'), 0)} | {_percent(cell.get('truncation_rate'))}% "
                f"| {_percent(cell.get('format_failure_rate'))}% |"
            )
        lines.append("")

    # ---- cost -------------------------------------------------------------------------------------
    lines += ["## Cost", "",
              "What it took to make each model, from the run directories it came from (found by following their config files; "
              "a teacher's own making is not followed): hours (GPU, CPU, or wall time when neither was recorded), training FLOPs "
              "(the compute ledger: teacher sampling and scoring, student sampling, training and extra no-grad passes; an estimate "
              "that leaves out attention, padding and cache savings), tokens trained on (with a loss), teacher tokens generated and "
              "scored, and the student's own samples (RL, on-policy). Eval FLOPs: the evaluation's own inference, not counted in the cost.", "",
              "| model | compute | training FLOPs | train tokens | teacher tokens generated | teacher tokens scored | student tokens sampled "
              "| eval FLOPs | mean response tokens | made from |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for entry, row in zip(table, rows):
        cost = entry["cost"]
        made_from = "; ".join(f"{stage}: {', '.join(str(p) for p in paths)}" for stage, paths in row.lineage.items()) or "—"
        lines.append(f"| {entry['label']} | {_hours_text(cost)} | {_flops_text(cost)} | {_number(cost.get('train_tokens'))} "
                     f"| {_number(cost.get('teacher_tokens'))} | {_number(cost.get('teacher_tokens_scored'))} "
                     f"| {_number(cost.get('student_tokens_generated'))} | {human(entry.get('eval_flops'))} "
                     f"| {_number(entry['response_tokens_mean'], 0)} | {made_from} |")
    lines += [""] + [f"{note}  " for note in _flops_notes(table)] if _flops_notes(table) else []
    if unlinked:
        lines += ["", "Run directories given but not linked to any evaluated model (their cost is not counted): "
                  + ", ".join(str(p) for p in unlinked)]
    lines += ["", "![pass@1 against the compute spent making each model](compute.png)", "",
              "![response lengths per benchmark and model](lengths.png)", ""]

    # ---- protocol and runs ----------------------------------------------------------------------------
    lines += ["## Protocol", ""]
    first = rows[0].protocol
    lines += [f"- temperature {first.get('temperature')}, top-p {first.get('top_p')}, max tokens {first.get('max_tokens')}, "
              f"system prompt {json.dumps(first.get('system_prompt'))}, instruction {json.dumps(first.get('instruction'))}"]
    for name in benchmarks:
        spec = next((r.protocol["benchmarks"][name] for r in rows if name in r.protocol.get("benchmarks", {})), None)
        if spec:
            lines.append(f"- {name}: {spec['problems']} problems, k={spec['k']}" + (f", limit {spec['limit']}" if spec.get("limit") else ""))
    lines += ["", "## Runs", "", "| model | run | evaluated model | engine | dtype | TP | GPU | eval wall time |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        env = row.metrics.get("environment", {})
        engine = f"{env.get('engine', '?')} {env.get('engine_version', '')}".strip()
        wall = row.metrics.get("generation_wall_time_s")
        lines.append(f"| {row.label} | {row.path} | {row.model} | {engine} | {env.get('dtype', '?')} | {env.get('tensor_parallel_size', '?')} "
                     f"| {env.get('gpu') or 'cpu'} | {_number(wall, 1) + ' s' if wall is not None else '—'} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_csv(path: Path, table, benchmarks) -> None:
    columns = ["model", "run", "evaluated_model"]
    for name in benchmarks:
        columns += [f"{name}_{c}" for c in ("pass@1", "pass@1_ci_low", "pass@1_ci_high", "pass@1_se", "cons@k", "k", "pass@k",
                                            "diff_vs_baseline", "diff_ci_low", "diff_ci_high", "p_value", "response_tokens_mean", "protocol_mismatch")]
    columns += ["gpu_hours", "cpu_hours", "wall_hours", "training_flops", "training_flops_estimated", "train_tokens", "teacher_tokens",
                "teacher_tokens_scored", "student_tokens_generated", "eval_flops", "response_tokens_mean"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for entry in table:
            values: dict[str, Any] = {"model": entry["label"], "run": entry["run"], "evaluated_model": entry["model"]}
            for name in benchmarks:
                cell = entry["benchmarks"].get(name)
                if cell is None:
                    continue
                low, high = cell.get("pass@1_ci95") or (None, None)
                test = cell.get("vs_baseline") or {}
                values.update({
                    f"{name}_pass@1": cell["pass@1"], f"{name}_pass@1_ci_low": low, f"{name}_pass@1_ci_high": high,
                    f"{name}_pass@1_se": cell["pass@1_se"], f"{name}_cons@k": cell["cons@k"], f"{name}_k": cell["k"],
                    f"{name}_pass@k": cell["pass@k"], f"{name}_diff_vs_baseline": test.get("difference"),
                    f"{name}_diff_ci_low": (test.get("ci95") or [None, None])[0], f"{name}_diff_ci_high": (test.get("ci95") or [None, None])[1],
                    f"{name}_p_value": test.get("p_value"), f"{name}_response_tokens_mean": cell["response_tokens_mean"],
                    f"{name}_protocol_mismatch": cell["mismatch"],
                })
            values.update({k: entry["cost"].get(k) for k in ("gpu_hours", "cpu_hours", "wall_hours", "train_tokens", "teacher_tokens",
                                                             "teacher_tokens_scored", "student_tokens_generated")})
            values.update(training_flops=entry["cost"].get("flops"), training_flops_estimated=bool(entry["cost"].get("flops_estimated")),
                          eval_flops=entry.get("eval_flops"))
            values["response_tokens_mean"] = entry["response_tokens_mean"]
            writer.writerow(values)


def _ci_bars(cell: Mapping[str, Any]) -> tuple[float, float]:
    """How far a cell's 95% CI reaches below and above its pass@1, in points (0 where a bound is unknown)."""
    value = cell["pass@1"]
    low, high = cell.get("pass@1_ci95") or (value, value)
    return 100 * max(0.0, value - (low if low is not None else value)), 100 * max(0.0, (high if high is not None else value) - value)


def write_plots(out: Path, table, rows: list[Row], benchmarks: list[str]) -> list[str]:
    """accuracy.png, lengths.png, compute.png; returns their file names.

    No text is placed inside a plot's data area: models are told apart by colour and marker and
    named in a legend below the axes (constrained layout keeps it clear of the axis labels), so
    labels cannot collide however close the points are."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = [entry["label"] for entry in table]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    style = {label: (colors[i % len(colors)], markers[i % len(markers)]) for i, label in enumerate(labels)}
    panel_rows = math.ceil(len(benchmarks) / 5)  # the per-benchmark figures: at most 5 panels a row
    columns = math.ceil(len(benchmarks) / panel_rows)
    legend_height = 0.3 * math.ceil(len(labels) / 4)

    def legend_below(figure, handles, names) -> None:
        # as many columns as fit the figure's width (about 0.07 in per character at this size)
        fit = int(figure.get_figwidth() / (0.07 * max(len(n) for n in names) + 0.6))
        figure.legend(handles, names, loc="outside lower center", ncol=max(1, min(len(names), 4, fit)), frameon=False, fontsize="small")

    def save(figure, name: str) -> None:
        figure.savefig(out / name, dpi=120, bbox_inches="tight")  # "tight": nothing drawn is cut off
        plt.close(figure)

    def mark(axis, x: float, label: str, cell) -> Any:
        # one model's pass@1 on one benchmark at x, its 95% CI as error bars (the scatter plots)
        color, marker = style[label]
        below, above = _ci_bars(cell)
        return axis.errorbar([x], [100 * cell["pass@1"]], yerr=[[below], [above]], fmt=marker, color=color, markersize=7, capsize=3, elinewidth=1)

    # accuracy with 95% CI error bars: one group per benchmark, one bar per model
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(benchmarks) * max(2, len(labels)) + 1.5), 4.2 + legend_height), layout="constrained")
    width = 0.8 / max(1, len(labels))
    bars = []
    for i, entry in enumerate(table):
        xs, ys, errors = [], [], [[], []]
        for j, name in enumerate(benchmarks):
            cell = entry["benchmarks"].get(name)
            if cell is None or cell.get("pass@1") is None:
                continue
            below, above = _ci_bars(cell)
            xs.append(j + (i - (len(labels) - 1) / 2) * width)
            ys.append(100 * cell["pass@1"])
            errors[0].append(below)
            errors[1].append(above)
        bars.append(axis.bar(xs, ys, width, yerr=errors, capsize=3, color=style[entry["label"]][0], error_kw={"elinewidth": 1}))
    axis.set_xticks(range(len(benchmarks)), benchmarks)
    axis.set_ylim(0, 105)
    axis.set_ylabel("pass@1 (%), 95% CI")
    axis.set_title("Accuracy per benchmark")
    axis.grid(axis="y", alpha=0.3)
    legend_below(figure, bars, labels)
    save(figure, "accuracy.png")

    # response-length distributions: one panel per benchmark, one box per model
    figure, axes = plt.subplots(panel_rows, columns, figsize=(max(6.0, 3.2 * columns), 3.2 * panel_rows + legend_height),
                                squeeze=False, layout="constrained")
    for axis, name in zip(axes.flat, benchmarks):
        present = [(label, d) for label, d in ((label, _lengths(row, name)) for label, row in zip(labels, rows)) if d]
        if present:
            boxes = axis.boxplot([d for _, d in present], patch_artist=True, widths=0.6,
                                 medianprops={"color": "black"}, flierprops={"markersize": 3})
            for box, (label, _) in zip(boxes["boxes"], present):
                box.set_facecolor(style[label][0])
                box.set_alpha(0.7)
            axis.set_xticks([])  # the colours say which model: see the legend
        axis.set_title(name)
        axis.grid(axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(benchmarks):]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel("response tokens")
    figure.suptitle("Response length\n(box: quartiles, line: median)", fontsize="medium")
    legend_below(figure, [Patch(color=style[label][0], alpha=0.7) for label in labels], labels)
    save(figure, "lengths.png")

    # accuracy against the compute spent making each model (base models: 0): one panel per
    # benchmark, one marker per model, the models named in the legend with their compute
    hours = [compute_hours(entry["cost"]) for entry in table]
    minutes = max(hours, default=0) < 1  # a toy run: minutes read better than 0.03 h
    xs = [60 * h if minutes else h for h in hours]
    devices = sorted({d for e in table for d, key in (("GPU", "gpu_hours"), ("CPU", "cpu_hours"), ("wall", "wall_hours")) if e["cost"].get(key)})
    figure, axes = plt.subplots(panel_rows, columns, figsize=(max(6.0, 3.2 * columns), 3.2 * panel_rows + legend_height + 0.3),
                                squeeze=False, sharey=True, layout="constrained")
    handles = {}
    for axis, name in zip(axes.flat, benchmarks):
        for x, entry in zip(xs, table):
            cell = entry["benchmarks"].get(name)
            if cell is None or cell.get("pass@1") is None:
                continue
            handles[entry["label"]] = mark(axis, x, entry["label"], cell)
        positive = [x for x in xs if x > 0]
        if positive and max(positive) / min(positive) > 100:
            axis.set_xscale("symlog", linthresh=min(positive))
        axis.set_title(name)
        axis.margins(x=0.15)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(benchmarks):]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel("pass@1 (%), 95% CI")
    for axis in axes[-1, :]:  # per axis, not supxlabel: a figure-level label would share the legend's strip
        axis.set_xlabel(f"{'minutes' if minutes else 'hours'} ({', '.join(devices) or 'none recorded'}) to make it")
    figure.suptitle("Accuracy against compute\n(teacher sampling + training)", fontsize="medium")
    shown = [label for label in labels if label in handles]
    legend_below(figure, [handles[label] for label in shown], [_cost_label(label, table[labels.index(label)]["cost"]) for label in shown])
    save(figure, "compute.png")

    # accuracy against the training FLOPs of the compute ledger: one panel per benchmark, x on a
    # log scale; a model nothing was spent on (the base) sits at the left edge, marked "0"
    flops = [entry["cost"].get("flops") for entry in table]
    positive = [f for f in flops if f]
    left = 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 0.0
    figure, axes = plt.subplots(panel_rows, columns, figsize=(max(6.0, 3.2 * columns), 3.2 * panel_rows + legend_height + 0.3),
                                squeeze=False, sharey=True, layout="constrained")
    handles = {}
    for axis, name in zip(axes.flat, benchmarks):
        for value, entry in zip(flops, table):
            cell = entry["benchmarks"].get(name)
            if value is None or cell is None or cell.get("pass@1") is None:
                continue  # unknown FLOPs: named in the legend, not placed
            handles[entry["label"]] = mark(axis, value or left, entry["label"], cell)
        if positive:
            axis.set_xscale("log")
            top = math.ceil(math.log10(max(positive)) + 0.3)
            decades = list(range(int(math.log10(left)) + 1, top + 1))
            decades = decades[:: max(1, math.ceil(len(decades) / 5))]
            axis.set_xticks([left] + [10.0**d for d in decades], ["0"] + [f"1e{d}" for d in decades])
            axis.minorticks_off()
            axis.set_xlim(left / 10**0.4, 10.0**top)
            axis.axvline(left * 10**0.5, color="grey", linestyle=":", linewidth=1)  # the axis is broken between 0 and the rest
        axis.set_title(name)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(benchmarks):]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel("pass@1 (%), 95% CI")
    for axis in axes[-1, :]:
        axis.set_xlabel("training FLOPs (estimated)")
    figure.suptitle("Accuracy against training compute\n(compute ledger: teacher + student FLOPs)", fontsize="medium")
    names = [f"{entry['label']} ({_flops_text(entry['cost'])} FLOPs{'' if entry['label'] in handles else ', not placed: unknown'})"
             for entry in table]
    from matplotlib.lines import Line2D

    legend_below(figure, [handles.get(entry["label"]) or Line2D([], [], linestyle="none") for entry in table], names)
    save(figure, "accuracy_vs_compute.png")
    return ["accuracy.png", "lengths.png", "compute.png", "accuracy_vs_compute.png"]

"""distill filter: keep the teacher traces worth learning from (rejection sampling + curation).

    distill filter --in runs/generate --out runs/filter [--student qwen-7b] [--recipe recipes/filter/r1.yaml] [key=value ...]

Reads a `distill generate` run directory (every shard) or any JSONL/Parquet with `problem`,
`answer` (the reference) and `completion` (`finish_reason`, `id`, `sample_idx` optional). Never
calls a teacher: filtering the same traces again with other settings is cheap. Writes into
--out: `accepted.parquet` (chat `messages`, what `distill train` reads), `rejected.parquet` (with
`reject_reason`), both with every verdict as columns; `stats.json`; `report.md`; `plots/*.png`;
and the run directory's `config.yaml`, `metrics.json` and `filter.log`.

Steps (top to bottom below):
1. Read the traces. A malformed row is a one-line error naming file and line, or with
   `on_bad_row=skip` a counted skip. Rows without `sample_idx` that would collide (several
   completions of one problem in a minimal file) are numbered in input order.
2. Verdicts per row, all of them recorded (not just the first failure):
   - answer: the shared `distill.verify.Verifier` (answer after the reasoning, math-verify
     under a hard time limit; `bad_reference` is its own reason, never a wrong answer);
   - format: exactly one non-empty `<think>...</think>` (tags configurable) then a final part;
   - truncation: `finish_reason == "length"`;
   - length (with --student): prompt rendered by the student's chat template + completion + end
     of turn, in the student's tokenizer, <= max_seq_len;
   - language: no other script than the problem's beyond a threshold (R1 filters mixed
     languages); repetition: no 200-character stretch repeated too often (degenerate loops).
3. Per problem: decontamination (word n-gram overlap with GSM8K, MATH-500, AIME24/25, AMC23
   and user files; default n=8), exact + near-duplicate problems (MinHash, Jaccard >= 0.8; the
   first seen is kept), the teacher's pass rate (correct / decided samples).
4. Curation: optional difficulty filter (pass rate in [pass_rate_min, pass_rate_max]); then
   per problem, among the rows that passed everything: all (the default, DeepSeek-R1's "retain
   only the correct ones"), the first k, the k shortest, or k at random (seeded per problem).
5. Outputs and the report.

A rejected row's `reject_reason` is the first failure in this order: contaminated, duplicate,
bad_reference, truncated, format, no_answer, wrong, timeout, too_long, language, repetition,
difficulty, not_selected; `failed_checks` lists all of them.

Simplifications: R1 also dropped long paragraphs and code blocks from its SFT data; we do not.
Duplicates are removed whole: the traces of the kept copy are not merged with those of the
removed one. The language check works on scripts (Latin vs CJK vs Cyrillic ...), so it cannot
tell English from French.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from tqdm import tqdm

from distill.errors import InputError
from distill.problems import PRESETS, load_problems
from distill.records import OnBadRow, TraceRecord, read_traces, write_parquet
from distill.rundir import RunDir, write_json
from distill.teacher.curate import BenchmarkIndex, BenchmarkItem, find_duplicates, select
from distill.verify import Verifier, check_format, check_language, check_repetition, is_truncated

REASONS = (
    "contaminated", "duplicate", "bad_reference", "truncated", "format", "no_answer", "wrong",
    "timeout", "too_long", "language", "repetition", "difficulty", "not_selected",
)
BENCHMARKS = ("gsm8k", "math500", "aime24", "aime25", "amc23")  # what `distill eval` scores on
BATCH = 256  # rows per verifier call: the progress bar moves, the pool stays busy


@dataclass(frozen=True)
class FilterConfig:
    traces: Path  # --in: a generate run directory, or a JSONL / Parquet file of traces
    out: Path  # --out: the run directory to write
    student: str | None = None  # preset or tokenizer (dir / hub id) for the length check
    max_seq_len: int | None = None  # None: the student preset's, else 32768
    on_bad_row: OnBadRow = "error"
    think_tags: tuple[str, str] = ("<think>", "</think>")  # Sky-T1/OpenThoughts: <|begin_of_thought|>, <|end_of_thought|>
    # answer check (the shared verifier)
    verifier_workers: int | None = None  # None: one per core
    verifier_timeout_s: float = 5.0  # hard wall-clock limit per check
    # No box, no "answer is": "none" rejects the trace (no_answer). A teacher trace that does not
    # state its answer is not worth training on, and a number picked from its working could be right by accident.
    no_answer_fallback: Literal["none", "last"] = "none"
    # row checks (False: still computed and recorded, but not a reason to reject)
    require_format: bool = True
    reject_truncated: bool = True
    language_check: bool = True
    language_max_foreign_fraction: float = 0.01
    language_max_foreign_run: int = 20  # letters
    repetition_check: bool = True
    repetition_window: int = 200  # characters (white space collapsed)
    repetition_max_repeats: int = 10  # reject when a window occurs more often than this
    # curation
    selection: Literal["all", "max_k", "shortest", "random_k"] = "all"
    k: int = 1  # for max_k, shortest, random_k
    seed: int = 0
    pass_rate_min: float = 0.0  # difficulty filter: keep problems whose pass rate is in [min, max]
    pass_rate_max: float = 1.0
    dedup: bool = True
    dedup_threshold: float = 0.8  # Jaccard similarity of word 3-gram sets
    decontaminate: tuple[str, ...] = BENCHMARKS  # presets or files (JSONL/Parquet/CSV with `problem`)
    decontamination_ngram: int = 8
    data_dir: Path | None = None  # local benchmark copies (../shared/data/eval layout); None: $DISTILL_DATA_DIR, else the hub
    plots: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.pass_rate_min <= self.pass_rate_max <= 1.0:
            raise ValueError(f"need 0 <= pass_rate_min <= pass_rate_max <= 1, got {self.pass_rate_min}, {self.pass_rate_max}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.verifier_timeout_s <= 0:
            raise ValueError(f"verifier_timeout_s must be > 0, got {self.verifier_timeout_s}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.decontamination_ngram < 1 or self.repetition_window < 1:
            raise ValueError("decontamination_ngram and repetition_window must be >= 1")
        if len(self.think_tags) != 2 or not self.think_tags[1]:
            raise ValueError(f"think_tags is two tags (start, end), e.g. '<think>,</think>'; got {self.think_tags!r}")


@dataclass
class Row:
    """Every verdict on one trace (one row of rejected/accepted.parquet besides the record)."""

    answer_verdict: str  # correct | wrong | no_answer | bad_reference | timeout
    correct: bool | None
    extracted: str | None
    format_ok: bool
    truncated: bool
    num_tokens: int | None  # in the student's tokenizer (with --student)
    length_ok: bool | None  # None without --student
    language_ok: bool
    foreign_fraction: float
    foreign_run: int
    repetition_ok: bool
    max_repeats: int
    contaminated_by: str | None = None  # "benchmark:item id"
    duplicate_of: str | None = None  # problem id of the kept copy
    pass_rate: float | None = None  # of the row's problem
    failed_checks: str = ""  # every failure, comma-separated, in REASONS order
    reject_reason: str | None = None


def run(cfg: FilterConfig, sources: dict[str, str] | None = None, verifier: Verifier | None = None) -> dict[str, Any]:
    """Filter `cfg.traces` into `cfg.out`; returns the final metrics. `verifier`: reuse a running
    one (its think tags must match the config's)."""
    rundir = RunDir(cfg.out, "filter", cfg, sources)
    rundir.announce(f"distill filter: {cfg.traces} -> {cfg.out}", shown=("traces", "out"))

    # 1. read ------------------------------------------------------------------------------
    read = read_traces(cfg.traces, cfg.on_bad_row)
    records = read.records
    for message in read.skipped:
        rundir.log.warning(f"skipped: {message}")
    if not records:
        raise InputError(f"{cfg.traces}: no traces to filter (every row was skipped or the input is empty)")
    renumbered = _number_samples(records)
    rundir.say(f"read {len(records)} traces of {len({r.problem_id for r in records})} problems"
               + (f" ({len(read.skipped)} bad rows skipped)" if read.skipped else ""))

    # 2. verdicts per row ------------------------------------------------------------------
    verdicts, verifier_summary = _grade(records, cfg, verifier, rundir)
    lengths = _student_lengths(records, cfg, rundir) if cfg.student else None
    max_len = lengths[1] if lengths else None
    rows: list[Row] = []
    for index, record in enumerate(tqdm(records, desc="checks", unit="trace", disable=None)):
        verdict = verdicts[index]
        language = check_language(record.problem, record.completion, cfg.language_max_foreign_fraction, cfg.language_max_foreign_run)
        repetition = check_repetition(record.completion, cfg.repetition_window, cfg.repetition_max_repeats)
        tokens = lengths[0][index] if lengths else None
        rows.append(Row(
            answer_verdict=verdict.reason, correct=verdict.correct, extracted=verdict.extracted,
            format_ok=check_format(record.completion, cfg.think_tags),
            truncated=is_truncated(record.finish_reason),
            num_tokens=tokens, length_ok=None if tokens is None else tokens <= max_len,
            language_ok=language.ok, foreign_fraction=language.foreign_fraction, foreign_run=language.longest_foreign_run,
            repetition_ok=repetition.ok, max_repeats=repetition.max_repeats,
        ))

    # 3. per problem: decontamination, duplicates, pass rate -------------------------------
    by_problem: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_problem.setdefault(record.problem_id, []).append(index)
    problem_ids = list(by_problem)
    texts = [records[by_problem[pid][0]].problem for pid in problem_ids]

    contaminated: dict[str, Any] = {}
    if cfg.decontaminate:
        index = BenchmarkIndex(load_benchmarks(cfg.decontaminate, cfg.data_dir), cfg.decontamination_ngram)
        for pid, text in zip(problem_ids, texts):
            match = index.match(text)
            if match is not None:
                contaminated[pid] = match
        rundir.say(f"decontamination: {len(contaminated)} problems share a {cfg.decontamination_ngram}-gram with "
                   f"{', '.join(cfg.decontaminate)} ({len(index.items)} benchmark problems)")
    duplicates: dict[str, Any] = {}
    if cfg.dedup:
        for duplicate in find_duplicates(texts, cfg.dedup_threshold, seed=cfg.seed):
            duplicates[problem_ids[duplicate.index]] = (problem_ids[duplicate.kept], duplicate)
        rundir.say(f"dedup: {len(duplicates)} problems copy an earlier one")
    pass_rates: dict[str, float | None] = {}
    for pid, indices in by_problem.items():
        decided = [rows[i].correct for i in indices if rows[i].correct is not None]
        pass_rates[pid] = sum(decided) / len(decided) if decided else None

    # 4. reasons, difficulty, selection ----------------------------------------------------
    for index, (record, row) in enumerate(zip(records, rows)):
        pid = record.problem_id
        failures = []
        if pid in contaminated:
            match = contaminated[pid]
            row.contaminated_by = f"{match.item.benchmark}:{match.item.item_id}"
            failures.append("contaminated")
        if pid in duplicates:
            row.duplicate_of = duplicates[pid][0]
            failures.append("duplicate")
        if row.answer_verdict == "bad_reference":
            failures.append("bad_reference")
        if row.truncated and cfg.reject_truncated:
            failures.append("truncated")
        if not row.format_ok and cfg.require_format:
            failures.append("format")
        if row.answer_verdict in ("no_answer", "wrong", "timeout"):
            failures.append(row.answer_verdict)
        if row.length_ok is False:
            failures.append("too_long")
        if not row.language_ok and cfg.language_check:
            failures.append("language")
        if not row.repetition_ok and cfg.repetition_check:
            failures.append("repetition")
        row.pass_rate = pass_rates[pid]
        row.failed_checks = ",".join(failures)
        row.reject_reason = failures[0] if failures else None

    lengths_all, length_unit = _lengths(records, rows)  # what "shortest" and the plots measure
    difficulty_on = cfg.pass_rate_min > 0.0 or cfg.pass_rate_max < 1.0
    for pid, indices in by_problem.items():
        rate = pass_rates[pid]
        if difficulty_on and (rate is None or not cfg.pass_rate_min <= rate <= cfg.pass_rate_max):
            for i in indices:
                if rows[i].reject_reason is None:
                    rows[i].reject_reason = "difficulty"
            continue
        candidates = [(i, records[i].sample_idx, lengths_all[i]) for i in indices if rows[i].reject_reason is None]
        chosen = set(select(candidates, cfg.selection, cfg.k, cfg.seed, pid))
        for i, _, _ in candidates:
            if i not in chosen:
                rows[i].reject_reason = "not_selected"

    # 5. outputs ---------------------------------------------------------------------------
    accepted = [i for i, row in enumerate(rows) if row.reject_reason is None]
    rejected = [i for i, row in enumerate(rows) if row.reject_reason is not None]
    write_parquet([records[i] for i in accepted], rundir.file("accepted.parquet"), _columns(rows, accepted, with_reason=False))
    write_parquet([records[i] for i in rejected], rundir.file("rejected.parquet"), _columns(rows, rejected, with_reason=True))
    stats = _stats(cfg, records, rows, by_problem, pass_rates, contaminated, duplicates, read.skipped, renumbered,
                   max_len, lengths_all, length_unit)
    stats["verifier"] = verifier_summary
    write_json(rundir.file("stats.json"), stats)
    plots = _plots(rundir.path, rows, pass_rates, lengths_all, length_unit) if cfg.plots else []
    _report(rundir.file("report.md"), cfg, stats, records, rows, problem_ids, texts, contaminated, duplicates, read.skipped, plots)

    metrics = {k: stats[k] for k in ("rows", "problems", "accepted", "rejected", "accept_rate", "accepted_problems",
                                      "reject_reasons", "check_failures", "skipped_rows")}
    metrics.update(contaminated_problems=len(contaminated), duplicate_problems=len(duplicates),
                   mean_pass_rate=stats["pass_rate"]["mean"], undecided=stats["verifier"].get("undecided", 0))
    rundir.write_metrics(metrics)
    rundir.say(f"kept {metrics['accept_rate']:.1%} of the traces, from {metrics['accepted_problems']} problems; "
               f"report: {rundir.file('report.md')}")
    return metrics


# --------------------------------------------------------------------------------------------
# step helpers

def _grade(records: list[TraceRecord], cfg: FilterConfig, verifier: Verifier | None, rundir: RunDir):
    if verifier is not None and tuple(verifier.think_tags) != tuple(cfg.think_tags):
        raise ValueError(f"the verifier passed in splits on {verifier.think_tags}, the config on {cfg.think_tags}")
    owned = verifier is None
    verifier = verifier or Verifier(workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s, think_tags=cfg.think_tags,
                                    no_answer_fallback=cfg.no_answer_fallback)
    before = dict(verifier.summary())
    verdicts = []
    try:
        with tqdm(total=len(records), desc="verify", unit="trace", disable=None) as bar:
            for start in range(0, len(records), BATCH):
                batch = records[start : start + BATCH]
                verdicts += verifier.grade([(r.answer, r.completion) for r in batch])
                bar.update(len(batch))
        after = verifier.summary()
    finally:
        if owned:
            verifier.close()
    summary = {k: v - before.get(k, 0) for k, v in after.items()}
    summary["undecided"] = summary.get("timeout", 0) + summary.get("crashed", 0) + summary.get("error", 0)
    rundir.say(f"verified {len(records)} answers: {summary.get('checked', 0)} math-verify checks, "
               f"{summary.get('cached', 0)} cached, {summary['undecided']} undecided (over the {cfg.verifier_timeout_s:g} s limit)")
    return verdicts, summary


def _number_samples(records: list[TraceRecord]) -> int:
    """Give rows that share (problem_id, sample_idx) the next free sample index of their problem
    (a minimal file with several completions per problem and no sample_idx); returns how many."""
    seen: dict[str, set[int]] = {}
    renumbered = 0
    for record in records:
        taken = seen.setdefault(record.problem_id, set())
        if record.sample_idx in taken:
            record.sample_idx = max(taken) + 1
            renumbered += 1
        taken.add(record.sample_idx)
    return renumbered


def _student_lengths(records: list[TraceRecord], cfg: FilterConfig, rundir: RunDir) -> tuple[list[int], int]:
    from distill.verify.length import StudentLength

    checker = StudentLength(cfg.student, cfg.max_seq_len)
    counts: list[int] = []
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        counts += checker.count([r.messages()[:-1] for r in batch], [r.completion for r in batch])
    rundir.say(f"length: {cfg.student} tokenizer, max_seq_len {checker.max_seq_len}: "
               f"{sum(c > checker.max_seq_len for c in counts)} conversations too long")
    return counts, checker.max_seq_len


def load_benchmarks(specs: Sequence[str], data_dir: Path | None) -> list[BenchmarkItem]:
    """Problems of the benchmarks (presets) and user files to decontaminate against."""
    items: list[BenchmarkItem] = []
    for spec in specs:
        try:
            problems = load_problems(spec, data_dir=data_dir, on_bad_row="skip").problems
        except InputError as error:
            raise InputError(
                f"decontaminate: {error}; set data_dir=DIR to local copies (../shared/data/eval layout), "
                f"or drop '{spec}' from decontaminate"
            ) from None
        name = spec if spec in PRESETS else Path(spec).name
        items += [BenchmarkItem(name, p.id, p.problem) for p in problems]
    return items


def _lengths(records: list[TraceRecord], rows: list[Row]) -> tuple[list[int], str]:
    """Completion lengths in one unit for the whole run: student tokens (with --student), else
    the teacher's token counts when every row has them, else characters."""
    if all(row.num_tokens is not None for row in rows):
        return [row.num_tokens for row in rows], "student tokens of the whole conversation"  # type: ignore[misc]
    if all(r.completion_tokens is not None for r in records):
        return [r.completion_tokens for r in records], "teacher tokens of the completion"  # type: ignore[misc]
    return [len(r.completion) for r in records], "characters of the completion"


def _columns(rows: list[Row], indices: list[int], with_reason: bool) -> dict[str, list]:
    names = [f.name for f in dataclasses.fields(Row) if with_reason or f.name != "reject_reason"]
    if with_reason:  # reject_reason first: it is what people look at
        names = ["reject_reason"] + [n for n in names if n != "reject_reason"]
    return {name: [getattr(rows[i], name) for i in indices] for name in names}


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {"count": len(ordered), "mean": round(statistics.fmean(ordered), 2), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)], "max": ordered[-1]}


def _stats(cfg, records, rows, by_problem, pass_rates, contaminated, duplicates, skipped, renumbered, max_len, lengths, unit) -> dict[str, Any]:
    accepted = [i for i, row in enumerate(rows) if row.reject_reason is None]
    reasons = Counter(row.reject_reason for row in rows if row.reject_reason)
    failures = Counter(name for row in rows for name in row.failed_checks.split(",") if name)
    decided_rates = [rate for rate in pass_rates.values() if rate is not None]
    bins = [0] * 10  # pass-rate histogram, [0, 0.1), ..., [0.9, 1.0]
    for rate in decided_rates:
        bins[min(9, int(rate * 10))] += 1
    by_benchmark = Counter(match.item.benchmark for match in contaminated.values())
    return {
        "input": str(cfg.traces),
        "rows": len(records),
        "problems": len(by_problem),
        "accepted": len(accepted),
        "rejected": len(records) - len(accepted),
        "accept_rate": round(len(accepted) / len(records), 6),
        "accepted_problems": len({records[i].problem_id for i in accepted}),
        "skipped_rows": len(skipped),
        "renumbered_samples": renumbered,
        "reject_reasons": {name: reasons[name] for name in REASONS if reasons[name]},
        "check_failures": {name: failures[name] for name in REASONS if failures[name]},
        "answer_verdicts": dict(Counter(row.answer_verdict for row in rows)),
        "pass_rate": {
            "mean": round(statistics.fmean(decided_rates), 6) if decided_rates else None,
            "histogram": {f"{b / 10:.1f}-{(b + 1) / 10:.1f}": count for b, count in enumerate(bins)},
            "undecided_problems": len(pass_rates) - len(decided_rates),
            "per_problem": pass_rates,
        },
        "decontamination": {
            "benchmarks": list(cfg.decontaminate),
            "ngram": cfg.decontamination_ngram,
            "removed_problems": len(contaminated),
            "by_benchmark": dict(by_benchmark),
        },
        "dedup": {
            "threshold": cfg.dedup_threshold if cfg.dedup else None,
            "exact": sum(1 for _, d in duplicates.values() if d.kind == "exact"),
            "near": sum(1 for _, d in duplicates.values() if d.kind == "near"),
        },
        "length_unit": unit,
        "max_seq_len": max_len,
        "lengths": {
            "accepted": _summary([lengths[i] for i in accepted]),
            "rejected": _summary([lengths[i] for i, row in enumerate(rows) if row.reject_reason is not None]),
        },
    }


# --------------------------------------------------------------------------------------------
# plots and report


def _plots(out: Path, rows: list[Row], pass_rates: dict[str, float | None], lengths: list[int], unit: str) -> list[str]:
    """PNG plots (matplotlib's Agg through Figure objects: no pyplot, no global backend change)."""
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []

    counts = Counter(row.reject_reason or "accepted" for row in rows)
    names = ["accepted"] + [name for name in REASONS if counts[name]]
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    axes.bar(names, [counts[name] for name in names], color=["tab:green"] + ["tab:red"] * (len(names) - 1))
    axes.set_ylabel("traces")
    axes.set_title("Accepted, and rejected by first failing check")
    axes.tick_params(axis="x", rotation=45)
    figure.savefig(folder / "reasons.png", dpi=100)
    written.append("plots/reasons.png")

    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    accepted = [lengths[i] for i, row in enumerate(rows) if row.reject_reason is None]
    rejected = [lengths[i] for i, row in enumerate(rows) if row.reject_reason is not None]
    if accepted or rejected:
        top = max(accepted + rejected) or 1
        edges = [top * b / 30 for b in range(31)]
        axes.hist([accepted, rejected], bins=edges, label=["accepted", "rejected"], color=["tab:green", "tab:red"], alpha=0.8)
    axes.set_xlabel(unit)
    axes.set_ylabel("traces")
    axes.set_title("Completion length")
    axes.legend()
    figure.savefig(folder / "lengths.png", dpi=100)
    written.append("plots/lengths.png")

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.hist([rate for rate in pass_rates.values() if rate is not None], bins=[b / 10 for b in range(11)], color="tab:blue")
    axes.set_xlabel("teacher pass rate (correct / decided samples)")
    axes.set_ylabel("problems")
    axes.set_title("Per-problem pass rate")
    figure.savefig(folder / "pass_rate.png", dpi=100)
    written.append("plots/pass_rate.png")
    return written


def _snippet(text: str, limit: int = 90) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _report(path: Path, cfg, stats, records, rows, problem_ids, texts, contaminated, duplicates, skipped, plots) -> None:
    text_of = dict(zip(problem_ids, texts))
    lines = [
        "# distill filter report",
        "",
        f"Input `{cfg.traces}`: {stats['rows']} traces of {stats['problems']} problems"
        + (f", {stats['skipped_rows']} bad rows skipped" if stats["skipped_rows"] else "") + ".",
        f"Accepted **{stats['accepted']}** traces ({stats['accept_rate']:.1%}) of {stats['accepted_problems']} problems; "
        f"rejected {stats['rejected']}. Selection: `{cfg.selection}`"
        + (f" (k={cfg.k})" if cfg.selection != "all" else "")
        + f"; pass-rate range [{cfg.pass_rate_min}, {cfg.pass_rate_max}].",
        "",
        "## Why traces were rejected",
        "",
        "| reason | first failing check (reject_reason) | failing at all (failed_checks) |",
        "|---|---:|---:|",
    ]
    for name in REASONS:
        first, total = stats["reject_reasons"].get(name, 0), stats["check_failures"].get(name, 0)
        if first or total:
            lines.append(f"| {name} | {first} | {total} |")
    verifier = stats["verifier"]
    lines += [
        "",
        f"Answer verdicts: {', '.join(f'{k} {v}' for k, v in sorted(stats['answer_verdicts'].items()))}. "
        f"Verifier: {verifier.get('checked', 0)} math-verify checks, {verifier.get('cached', 0)} cache hits, "
        f"{verifier.get('quick', 0)} settled without sympy, {verifier.get('undecided', 0)} undecided "
        f"(limit {cfg.verifier_timeout_s:g} s per check).",
        "",
        f"Mean teacher pass rate per problem: {stats['pass_rate']['mean']}"
        f" ({stats['pass_rate']['undecided_problems']} problems without a decided verdict). "
        f"Lengths, in {stats['length_unit']}: accepted median {stats['lengths']['accepted']['median']}, "
        f"rejected median {stats['lengths']['rejected']['median']}.",
        "",
    ]
    for plot in plots:
        lines += [f"![{Path(plot).stem}]({plot})", ""]
    lines += [f"## Decontamination ({len(contaminated)} problems removed)", ""]
    if cfg.decontaminate:
        lines.append(f"Word {cfg.decontamination_ngram}-gram overlap with: {', '.join(cfg.decontaminate)}.")
        lines.append("")
    else:
        lines += ["Off (`decontaminate` is empty).", ""]
    if contaminated:
        lines += ["| problem id | problem | benchmark | item | benchmark problem | shared n-grams |", "|---|---|---|---|---|---:|"]
        for pid, match in contaminated.items():
            lines.append(f"| `{pid}` | {_snippet(text_of[pid])} | {match.item.benchmark} | `{match.item.item_id}` | "
                         f"{_snippet(match.item.text)} | {match.shared_ngrams} |")
        lines.append("")
    lines += [f"## Duplicate problems ({len(duplicates)} removed)", ""]
    if duplicates:
        lines += ["| problem id | problem | copy of | kind | similarity |", "|---|---|---|---|---:|"]
        for pid, (kept, duplicate) in duplicates.items():
            lines.append(f"| `{pid}` | {_snippet(text_of[pid])} | `{kept}` | {duplicate.kind} | {duplicate.similarity} |")
        lines.append("")
    if skipped:
        lines += [f"## Skipped rows ({len(skipped)})", ""] + [f"- {message}" for message in skipped] + [""]
    lines += [
        "## Files",
        "",
        "- `accepted.parquet`: the kept traces with chat `messages` (input of `distill train`) and every verdict",
        "- `rejected.parquet`: the others, with `reject_reason`, `failed_checks` and every verdict",
        "- `stats.json`: all counts, per-problem pass rates, length summaries",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")

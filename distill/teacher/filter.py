"""distill filter: keep the teacher traces worth learning from (rejection sampling + curation).

    distill filter --in runs/generate --out runs/filter [--student qwen-7b] [--recipe recipes/filter/r1.yaml] [key=value ...]

Reads a `distill generate` run directory (every shard) or any JSONL/Parquet with `problem`,
`answer` (the reference) and `completion` (`finish_reason`, `id`, `sample_idx` optional). Never
calls a teacher: filtering the same traces again with other settings is cheap. Writes into
--out: `accepted.parquet` (chat `messages`, what `distill train` reads), `rejected.parquet` (with
`reject_reason`), both with every verdict as columns; `stats.json`; `report.md`; `plots/*.png`;
and the run directory's `config.yaml`, `metrics.json` and `filter.log`.

Steps (top to bottom below). The traces are streamed twice (verdicts, then outputs) and only
compact per-row verdicts and per-problem facts are held between the passes, so memory stays
bounded (1M traces: 0.87 GB, bench/scale_filter.py):
1. Read the traces. A malformed row is a one-line error naming file and line, or with
   `on_bad_row=skip` a counted skip. Rows without `sample_idx` that would collide (several
   completions of one problem in a minimal file) are numbered in input order.
2. Verdicts per row, all of them recorded (not just the first failure):
   - answer: the shared `distill.verify.Verifier` (answer after the reasoning, math-verify
     under a hard time limit; `bad_reference` is its own reason, never a wrong answer);
   - format: exactly one non-empty `<think>...</think>` (tags configurable) then a final part;
   - truncation: `finish_reason == "length"`;
   - length (with --student): the conversation encoded exactly as `distill train --student`
     encodes it (its template, segments and tokenizer), <= the max_seq_len training uses;
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

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
from tqdm import tqdm

from distill.compute import filter_block
from distill.errors import InputError
from distill.problems import PRESETS, load_problems
from distill.records import OnBadRow, ParquetSink, TraceRecord, iter_traces
from distill.rundir import RunDir, write_json
from distill.teacher.curate import BenchmarkIndex, BenchmarkItem, DuplicateFinder, select
from distill.verify import Verifier, check_format, check_language, check_repetition, is_truncated
from distill.verify.length import StudentLength

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


# The verdict columns of accepted.parquet / rejected.parquet (besides the record's own), in order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("answer_verdict", "string"),  # correct | wrong | no_answer | bad_reference | timeout
    ("correct", "bool"),  # None when not decided
    ("extracted", "string"),
    ("format_ok", "bool"),
    ("truncated", "bool"),
    ("num_tokens", "int64"),  # in the student's tokenizer, as training counts them (with --student)
    ("length_ok", "bool"),  # None without --student
    ("language_ok", "bool"),
    ("foreign_fraction", "double"),
    ("foreign_run", "int64"),
    ("repetition_ok", "bool"),
    ("max_repeats", "int64"),
    ("contaminated_by", "string"),  # "benchmark:item id"
    ("duplicate_of", "string"),  # problem id of the kept copy
    ("pass_rate", "double"),  # of the row's problem
    ("failed_checks", "string"),  # every failure, comma-separated, in REASONS order
)


class Verdicts:
    """Every row's verdicts, one compact column each (lists of shared objects and typed arrays:
    about 150 bytes a row, not the trace), in input order. What the per-problem steps and the
    outputs need; the traces themselves are read again when the outputs are written."""

    def __init__(self) -> None:
        from array import array

        self.problem = array("i")  # index into the problem list
        self.sample_idx = array("q")  # after renumbering
        self.answer_verdict: list[str] = []
        self.correct: list[bool | None] = []
        self.extracted: list[str | None] = []
        self.format_ok: list[bool] = []
        self.truncated: list[bool] = []
        self.num_tokens = array("q")  # -1: not counted
        self.language_ok: list[bool] = []
        self.foreign_fraction = array("d")
        self.foreign_run = array("q")
        self.repetition_ok: list[bool] = []
        self.max_repeats = array("q")
        self.teacher_tokens = array("q")  # the record's completion_tokens; -1: unknown
        self.characters = array("q")  # of the completion
        self.failed_checks: list[str] = []
        self.reject_reason: list[str | None] = []
        self.max_len = 0  # the student's max_seq_len (with --student)

    def __len__(self) -> int:
        return len(self.answer_verdict)

    def length_ok(self, index: int) -> bool | None:
        return None if self.num_tokens[index] < 0 else self.num_tokens[index] <= self.max_len


def run(cfg: FilterConfig, sources: dict[str, str] | None = None, verifier: Verifier | None = None) -> dict[str, Any]:
    """Filter `cfg.traces` into `cfg.out`; returns the final metrics. `verifier`: reuse a running
    one (its think tags must match the config's).

    Memory stays bounded whatever the input's size: the traces are streamed twice (verdicts, then
    the outputs), and between the two passes only per-row verdicts (`Verdicts`) and per-problem
    facts (id, first text, LSH hashes) are held."""
    rundir = RunDir(cfg.out, "filter", cfg, sources)
    rundir.announce(f"distill filter: {cfg.traces} -> {cfg.out}", shown=("traces", "out"))

    # 1-2. read (streamed) and every verdict per row; per problem: first text, decontamination,
    # near-duplicate signature ------------------------------------------------------------------
    if verifier is not None and tuple(verifier.think_tags) != tuple(cfg.think_tags):
        raise ValueError(f"the verifier passed in splits on {verifier.think_tags}, the config on {cfg.think_tags}")
    lengths = StudentLength(cfg.student, cfg.max_seq_len) if cfg.student else None  # training's own count
    benchmarks = BenchmarkIndex(load_benchmarks(cfg.decontaminate, cfg.data_dir), cfg.decontamination_ngram) if cfg.decontaminate else None
    finder = DuplicateFinder(cfg.dedup_threshold, seed=cfg.seed) if cfg.dedup else None
    owned = verifier is None
    verifier = verifier or Verifier(workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s, think_tags=cfg.think_tags,
                                    no_answer_fallback=cfg.no_answer_fallback)
    before = dict(verifier.summary())
    skipped: list[str] = []
    rows = Verdicts()
    rows.max_len = lengths.max_seq_len if lengths else 0
    problem_index: dict[str, int] = {}
    problem_ids: list[str] = []
    texts: list[str] = []  # the first text seen of each problem
    taken: list[set[int]] = []  # sample indices seen per problem
    contaminated: dict[str, Any] = {}
    renumbered = 0
    try:
        with tqdm(desc="verify + checks", unit="trace", disable=None) as bar:
            for batch in _batches(iter_traces(cfg.traces, cfg.on_bad_row, skipped), BATCH):
                for record in batch:
                    number = problem_index.get(record.problem_id)
                    if number is None:
                        number = problem_index[record.problem_id] = len(problem_ids)
                        problem_ids.append(record.problem_id)
                        texts.append(record.problem)
                        taken.append(set())
                        match = benchmarks.match(record.problem) if benchmarks is not None else None
                        if match is not None:
                            contaminated[record.problem_id] = match
                        if finder is not None:
                            finder.add(record.problem)
                    # Rows sharing (problem_id, sample_idx) (a minimal file with several completions
                    # per problem and no sample_idx) get the next free index of their problem.
                    if record.sample_idx in taken[number]:
                        record.sample_idx = max(taken[number]) + 1
                        renumbered += 1
                    taken[number].add(record.sample_idx)
                    rows.problem.append(number)
                    rows.sample_idx.append(record.sample_idx)
                _check_rows(batch, verifier.grade([(r.answer, r.completion) for r in batch]), lengths, cfg, rows)
                bar.update(len(batch))
        after = verifier.summary()
    finally:
        if owned:
            verifier.close()
    for message in skipped:
        rundir.log.warning(f"skipped: {message}")
    if not len(rows):
        raise InputError(f"{cfg.traces}: no traces to filter (every row was skipped or the input is empty)")
    del taken
    rundir.say(f"read {len(rows)} traces of {len(problem_ids)} problems" + (f" ({len(skipped)} bad rows skipped)" if skipped else ""))
    verifier_summary = {k: v - before.get(k, 0) for k, v in after.items()}
    verifier_summary["undecided"] = verifier_summary.get("timeout", 0) + verifier_summary.get("crashed", 0) + verifier_summary.get("error", 0)
    rundir.say(f"verified {len(rows)} answers: {verifier_summary.get('checked', 0)} math-verify checks, "
               f"{verifier_summary.get('cached', 0)} cached, {verifier_summary['undecided']} undecided (over the {cfg.verifier_timeout_s:g} s limit)")
    if lengths:
        too_long = sum(1 for n in rows.num_tokens if n > lengths.max_seq_len)
        rundir.say(f"length: {cfg.student}'s training tokenization (template '{lengths.template.name}'), max_seq_len {lengths.max_seq_len} "
                   f"({lengths.source}): {too_long} conversations too long")

    # 3. per problem: decontamination, duplicates, pass rate -----------------------------------
    if benchmarks is not None:
        rundir.say(f"decontamination: {len(contaminated)} problems share a {cfg.decontamination_ngram}-gram with "
                   f"{', '.join(cfg.decontaminate)} ({len(benchmarks.items)} benchmark problems)")
    duplicates: dict[str, Any] = {}
    if finder is not None:
        for duplicate in finder.finish(texts.__getitem__):
            duplicates[problem_ids[duplicate.index]] = (problem_ids[duplicate.kept], duplicate)
        rundir.say(f"dedup: {len(duplicates)} problems copy an earlier one")
    problem_of = np.frombuffer(rows.problem, dtype=np.int32)
    by_problem = np.split(np.argsort(problem_of, kind="stable"), np.cumsum(np.bincount(problem_of, minlength=len(problem_ids)))[:-1])
    decided = np.bincount(problem_of, weights=[c is not None for c in rows.correct], minlength=len(problem_ids))
    correct = np.bincount(problem_of, weights=[c is True for c in rows.correct], minlength=len(problem_ids))
    pass_rates: dict[str, float | None] = {
        pid: float(correct[p] / decided[p]) if decided[p] else None for p, pid in enumerate(problem_ids)
    }

    # 4. reasons, difficulty, selection -------------------------------------------------------
    for index in range(len(rows)):
        pid = problem_ids[rows.problem[index]]
        failures = []
        if pid in contaminated:
            failures.append("contaminated")
        if pid in duplicates:
            failures.append("duplicate")
        verdict = rows.answer_verdict[index]
        if verdict == "bad_reference":
            failures.append("bad_reference")
        if rows.truncated[index] and cfg.reject_truncated:
            failures.append("truncated")
        if not rows.format_ok[index] and cfg.require_format:
            failures.append("format")
        if verdict in ("no_answer", "wrong", "timeout"):
            failures.append(verdict)
        if rows.length_ok(index) is False:
            failures.append("too_long")
        if not rows.language_ok[index] and cfg.language_check:
            failures.append("language")
        if not rows.repetition_ok[index] and cfg.repetition_check:
            failures.append("repetition")
        rows.failed_checks.append(",".join(failures))
        rows.reject_reason.append(failures[0] if failures else None)

    lengths_all, length_unit = _lengths(rows)  # what "shortest" and the plots measure
    difficulty_on = cfg.pass_rate_min > 0.0 or cfg.pass_rate_max < 1.0
    for number, members in enumerate(by_problem):
        pid = problem_ids[number]
        indices = members.tolist()
        rate = pass_rates[pid]
        if difficulty_on and (rate is None or not cfg.pass_rate_min <= rate <= cfg.pass_rate_max):
            for i in indices:
                if rows.reject_reason[i] is None:
                    rows.reject_reason[i] = "difficulty"
            continue
        candidates = [(i, rows.sample_idx[i], lengths_all[i]) for i in indices if rows.reject_reason[i] is None]
        chosen = set(select(candidates, cfg.selection, cfg.k, cfg.seed, pid))
        for i, _, _ in candidates:
            if i not in chosen:
                rows.reject_reason[i] = "not_selected"

    # 5. outputs: the traces read again, written out in bounded row groups ---------------------
    _write_outputs(cfg, rundir, rows, problem_ids, pass_rates, contaminated, duplicates)
    stats = _stats(cfg, rows, problem_ids, pass_rates, contaminated, duplicates, skipped, renumbered,
                   rows.max_len or None, lengths_all, length_unit)
    stats["verifier"] = verifier_summary
    write_json(rundir.file("stats.json"), stats)
    plots = _plots(rundir.path, rows, pass_rates, lengths_all, length_unit) if cfg.plots else []
    _report(rundir.file("report.md"), cfg, stats, problem_ids, texts, contaminated, duplicates, skipped, plots)
    _warn_drops(cfg, rundir, stats, len(skipped))

    metrics = {k: stats[k] for k in ("rows", "problems", "accepted", "rejected", "accept_rate", "accepted_problems",
                                      "reject_reasons", "check_failures", "skipped_rows")}
    metrics.update(contaminated_problems=len(contaminated), duplicate_problems=len(duplicates),
                   mean_pass_rate=stats["pass_rate"]["mean"], undecided=stats["verifier"].get("undecided", 0))
    metrics["compute"] = filter_block([cfg.traces])  # no model runs here; the traces' ledger is the cost
    rundir.write_metrics(metrics)
    rundir.say(f"kept {metrics['accept_rate']:.1%} of the traces, from {metrics['accepted_problems']} problems; "
               f"report: {rundir.file('report.md')}")
    return metrics


# --------------------------------------------------------------------------------------------
# step helpers


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _check_rows(batch: list[TraceRecord], verdicts: list, lengths, cfg: FilterConfig, rows: Verdicts) -> None:
    """Append the verdicts of one batch of records to `rows`."""
    tokens = lengths.count([r.messages() for r in batch]) if lengths else [-1] * len(batch)
    for record, verdict, count in zip(batch, verdicts, tokens):
        language = check_language(record.problem, record.completion, cfg.language_max_foreign_fraction, cfg.language_max_foreign_run)
        repetition = check_repetition(record.completion, cfg.repetition_window, cfg.repetition_max_repeats)
        rows.answer_verdict.append(verdict.reason)
        rows.correct.append(verdict.correct)
        rows.extracted.append(verdict.extracted)
        rows.format_ok.append(check_format(record.completion, cfg.think_tags))
        rows.truncated.append(is_truncated(record.finish_reason))
        rows.num_tokens.append(count)
        rows.language_ok.append(language.ok)
        rows.foreign_fraction.append(language.foreign_fraction)
        rows.foreign_run.append(language.longest_foreign_run)
        rows.repetition_ok.append(repetition.ok)
        rows.max_repeats.append(repetition.max_repeats)
        rows.teacher_tokens.append(record.completion_tokens if record.completion_tokens is not None else -1)
        rows.characters.append(len(record.completion))


def _write_outputs(cfg: FilterConfig, rundir: RunDir, rows: Verdicts, problem_ids: list[str], pass_rates, contaminated, duplicates) -> None:
    """Stream the input again and write each row to accepted.parquet or rejected.parquet with its
    verdicts. The rows must be the ones the first pass read: a file still being appended to (a
    running `distill generate`) is read only as far as the first pass read it."""
    import pyarrow as pa

    types = {name: pa.type_for_alias(kind) for name, kind in COLUMNS}
    names = [name for name, _ in COLUMNS]
    total = len(rows)
    done = 0
    with ParquetSink(rundir.file("accepted.parquet"), types) as accepted, \
            ParquetSink(rundir.file("rejected.parquet"), {"reject_reason": pa.string(), **types}) as rejected:  # fmt: skip
        with tqdm(total=total, desc="write", unit="trace", disable=None) as bar:
            for batch in _batches(iter_traces(cfg.traces, cfg.on_bad_row, []), BATCH * 4):
                batch = batch[: total - done]
                kept: list[tuple[TraceRecord, int]] = []
                dropped: list[tuple[TraceRecord, int]] = []
                for index, record in enumerate(batch, start=done):
                    pid = problem_ids[rows.problem[index]]
                    if record.problem_id != pid:
                        raise InputError(f"{cfg.traces}: the input changed while it was being filtered (row {index + 1} is now problem "
                                         f"{record.problem_id!r}, was {pid!r}); filter again once it stops changing")
                    record.sample_idx = rows.sample_idx[index]
                    (kept if rows.reject_reason[index] is None else dropped).append((record, index))
                for sink, chosen, reason in ((accepted, kept, False), (rejected, dropped, True)):
                    if not chosen:
                        continue
                    columns: dict[str, list] = {"reject_reason": [rows.reject_reason[i] for _, i in chosen]} if reason else {}
                    for name in names:
                        columns[name] = [_value(rows, name, i, problem_ids, pass_rates, contaminated, duplicates) for _, i in chosen]
                    sink.write([record for record, _ in chosen], columns)
                done += len(batch)
                bar.update(len(batch))
                if done >= total:
                    break
    if done != total:
        raise InputError(f"{cfg.traces}: the input changed while it was being filtered ({total} rows read, then {done}); filter again")


def _value(rows: Verdicts, name: str, index: int, problem_ids, pass_rates, contaminated, duplicates) -> Any:
    """Output column `name` of row `index`."""
    pid = problem_ids[rows.problem[index]]
    if name == "num_tokens":
        return rows.num_tokens[index] if rows.num_tokens[index] >= 0 else None
    if name == "length_ok":
        return rows.length_ok(index)
    if name == "pass_rate":
        return pass_rates[pid]
    if name == "contaminated_by":
        match = contaminated.get(pid)
        return f"{match.item.benchmark}:{match.item.item_id}" if match is not None else None
    if name == "duplicate_of":
        return duplicates[pid][0] if pid in duplicates else None
    return getattr(rows, name)[index]


def _warn_drops(cfg: FilterConfig, rundir: RunDir, stats: dict[str, Any], skipped: int) -> None:
    """Rejections the user may not expect, over 1% of the input: a warning with the setting."""
    rows, failures = stats["rows"], stats["check_failures"]
    rundir.warn_dropped("malformed", skipped, rows + skipped, "bad rows skipped (on_bad_row=skip)", "fix those rows (filter.log lists them)")
    rundir.warn_dropped("too_long", failures.get("too_long", 0), rows,
                        f"traces longer than max_seq_len={stats['max_seq_len']} as {cfg.student} trains on them",
                        "raise max_seq_len (and train with at least as much)")
    if cfg.reject_truncated:
        rundir.warn_dropped("truncated", failures.get("truncated", 0), rows, "traces cut off by the teacher's token limit (finish_reason length)",
                            "raise max_tokens in distill generate, or reject_truncated=false keeps them")
    rundir.warn_dropped("timeout", stats["answer_verdicts"].get("timeout", 0), rows,
                        f"answers left undecided by the verifier's {cfg.verifier_timeout_s:g} s limit", "raise verifier_timeout_s")


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


def _lengths(rows: Verdicts) -> tuple[list[int], str]:
    """Completion lengths in one unit for the whole run: student tokens (with --student), else
    the teacher's token counts when every row has them, else characters."""
    if all(n >= 0 for n in rows.num_tokens):
        return rows.num_tokens.tolist(), "student tokens of the whole conversation"
    if all(n >= 0 for n in rows.teacher_tokens):
        return rows.teacher_tokens.tolist(), "teacher tokens of the completion"
    return rows.characters.tolist(), "characters of the completion"


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {"count": len(ordered), "mean": round(statistics.fmean(ordered), 2), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)], "max": ordered[-1]}


def _stats(cfg, rows: Verdicts, problem_ids, pass_rates, contaminated, duplicates, skipped, renumbered, max_len, lengths, unit) -> dict[str, Any]:
    accepted = [i for i, reason in enumerate(rows.reject_reason) if reason is None]
    reasons = Counter(reason for reason in rows.reject_reason if reason)
    failures = Counter(name for checks in rows.failed_checks for name in checks.split(",") if name)
    decided_rates = [rate for rate in pass_rates.values() if rate is not None]
    bins = [0] * 10  # pass-rate histogram, [0, 0.1), ..., [0.9, 1.0]
    for rate in decided_rates:
        bins[min(9, int(rate * 10))] += 1
    by_benchmark = Counter(match.item.benchmark for match in contaminated.values())
    return {
        "input": str(cfg.traces),
        "rows": len(rows),
        "problems": len(problem_ids),
        "accepted": len(accepted),
        "rejected": len(rows) - len(accepted),
        "accept_rate": round(len(accepted) / len(rows), 6),
        "accepted_problems": len({rows.problem[i] for i in accepted}),
        "skipped_rows": len(skipped),
        "renumbered_samples": renumbered,
        "reject_reasons": {name: reasons[name] for name in REASONS if reasons[name]},
        "check_failures": {name: failures[name] for name in REASONS if failures[name]},
        "answer_verdicts": dict(Counter(rows.answer_verdict)),
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
            "rejected": _summary([lengths[i] for i, reason in enumerate(rows.reject_reason) if reason is not None]),
        },
    }


# --------------------------------------------------------------------------------------------
# plots and report


def _plots(out: Path, rows: Verdicts, pass_rates: dict[str, float | None], lengths: list[int], unit: str) -> list[str]:
    """PNG plots (matplotlib's Agg through Figure objects: no pyplot, no global backend change)."""
    from matplotlib.figure import Figure

    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    written = []

    counts = Counter(reason or "accepted" for reason in rows.reject_reason)
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
    accepted = [lengths[i] for i, reason in enumerate(rows.reject_reason) if reason is None]
    rejected = [lengths[i] for i, reason in enumerate(rows.reject_reason) if reason is not None]
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


def _report(path: Path, cfg, stats, problem_ids, texts, contaminated, duplicates, skipped, plots) -> None:
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

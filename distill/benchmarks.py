"""Evaluation benchmarks: which problems, and how many samples of each, `distill eval` scores.

    load_benchmark("aime24", data_dir="../shared/data/eval")   # a preset, local copy
    load_benchmark("math500")                                  # a preset, from the hub
    load_benchmark("my_set.jsonl")                             # user JSONL: `problem`, `answer` (and `id`)
    load_benchmark("olymp=data/olymp.jsonl")                   # the same, with the name used in reports

The presets are those of `distill.problems` (one loader for every stage); this module adds what
evaluation needs on top: a report name and the number of samples per problem `k`, whose
defaults follow the DeepSeek-R1 paper's practice of more samples where a benchmark is small
and noisy (AIME 64, AMC 32, MATH-500 4, GSM8K 1). A user file gets k = 4 unless `--k` says.

The data directory (`data_dir=`, else $DISTILL_DATA_DIR) holds local copies laid out like
../shared/data/eval (`math500/test.jsonl`, ...); a preset without a local copy is read from the
hub. A benchmark without reference answers cannot be scored and is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from distill.errors import ConfigError, InputError
from distill.problems import PRESETS, Fields, Problem, load_problems

# Samples per problem when `--k` is not given (DeepSeek-R1 paper, section 3 / distilled models).
DEFAULT_K: dict[str, int] = {"aime24": 64, "aime25": 64, "amc23": 32, "math500": 4, "gsm8k": 1}
USER_DEFAULT_K = 4
EVAL_PRESETS = tuple(DEFAULT_K)  # the presets that are evaluation sets (others are training data)


@dataclass(frozen=True)
class Benchmark:
    name: str  # the name in reports and file names: "aime24", or a user file's stem / given name
    spec: str  # what `load_problems` reads: a preset name or a file path
    default_k: int
    problems: tuple[Problem, ...]

    @property
    def problem_set(self) -> str:
        """A short hash of the problem ids in order: two runs with the same hash scored the same
        problems (compare checks it, so a `--limit 50` run is not put beside a full one)."""
        digest = hashlib.sha256("\n".join(p.id for p in self.problems).encode("utf-8"))
        return digest.hexdigest()[:12]


def parse_spec(spec: str) -> tuple[str, str]:
    """'math500' -> ('math500', 'math500'); 'name=path.jsonl' -> ('name', 'path.jsonl');
    'dir/set.jsonl' -> ('set', 'dir/set.jsonl')."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("benchmarks: an empty name; give e.g. --benchmarks math500,aime24")
    name, sep, path = spec.partition("=")
    if sep:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path:
            raise ConfigError(f"benchmarks: '{spec}' should read NAME=FILE with NAME of letters, digits, '_', '-', '.'")
        return name, path
    if spec in PRESETS:
        return spec, spec
    return Path(spec).stem, spec


def load_benchmark(
    spec: str,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    fields: Fields | None = None,
) -> Benchmark:
    """One benchmark: its problems (the first `limit` of them, in file order) and default k."""
    name, source = parse_spec(spec)
    if source in PRESETS and source not in EVAL_PRESETS:
        raise ConfigError(
            f"benchmarks: '{source}' is a training set, not an evaluation benchmark; use one of {', '.join(EVAL_PRESETS)} or a JSONL file"
        )
    if source not in PRESETS and not Path(source).is_file():
        raise InputError(
            f"benchmarks: '{source}' is neither a benchmark ({', '.join(EVAL_PRESETS)}) nor an existing file; "
            "a user benchmark is a JSONL with 'problem' and 'answer' per line"
        )
    data_dir = data_dir or os.environ.get("DISTILL_DATA_DIR")
    problems = load_problems(source, data_dir=data_dir, limit=limit, fields=fields).problems
    unanswered = [p.id for p in problems if not p.answer]
    if unanswered:
        raise InputError(
            f"{source}: {len(unanswered)} problem(s) have no reference answer (first: id {unanswered[0]!r}); "
            "every benchmark problem needs an 'answer'"
        )
    default_k = DEFAULT_K.get(source, USER_DEFAULT_K)
    return Benchmark(name=name, spec=source, default_k=default_k, problems=tuple(problems))


def load_benchmarks(specs: list[str] | tuple[str, ...], **options) -> list[Benchmark]:
    benchmarks = [load_benchmark(spec, **options) for spec in specs]
    names = [b.name for b in benchmarks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"benchmarks: '{duplicates[0]}' is named twice; give one a name with NAME=FILE")
    return benchmarks

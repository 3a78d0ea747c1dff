"""Problems with reference answers, from local files, presets or the hub: what generate, eval,
grpo and decontamination read.

    load_problems("problems.jsonl")                 # local JSONL / Parquet / CSV
    load_problems("math500", data_dir="../shared/data/eval")   # a preset, local copy
    load_problems("math500")                        # a preset, from the hub
    load_problems("AI-MO/NuminaMath-1.5@train")     # any hub dataset: name[:config][@split]

A preset knows its hub id, its local file name under a data directory and its field names.
The data directory is `data_dir=`, else $DISTILL_DATA_DIR; a preset whose local file is there is
read from it, otherwise from the hub. Rows without an id get `stable_id(problem)`. Duplicate ids,
empty problems and missing fields are errors naming file and line (or counted skips).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from distill.errors import InputError
from distill.records import OnBadRow, answer_text, iter_jsonl, stable_id


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str | None  # reference answer as text; None when the source has none
    source: str


@dataclass(frozen=True)
class Fields:
    """Column names of a source. `None` for id means: derive a stable id from the problem text."""

    problem: str = "problem"
    answer: str | None = "answer"
    id: str | None = "id"


@dataclass(frozen=True)
class Preset:
    hub: str  # dataset name on the hub
    split: str
    fields: Fields
    local: str | None = None  # file under the data directory (../shared/data/eval layout)
    config: str | None = None  # hub dataset config
    reference: str = "plain"  # how the answer column is written: "plain" | "gsm8k" ("... #### 72")


# Hub ids are the common public copies; the local names follow ../shared/data/eval.
PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("openai/gsm8k", "test", Fields("question", "answer", None), "gsm8k/test.jsonl", "main", "gsm8k"),
    "gsm8k-train": Preset("openai/gsm8k", "train", Fields("question", "answer", None), "gsm8k/train.jsonl", "main", "gsm8k"),
    "math500": Preset("HuggingFaceH4/MATH-500", "test", Fields("problem", "answer", "unique_id"), "math500/test.jsonl"),
    "aime24": Preset("HuggingFaceH4/aime_2024", "train", Fields("problem", "answer", "id"), "aime24/test.jsonl"),
    "aime25": Preset("math-ai/aime25", "test", Fields("problem", "answer", "id"), "aime25/test.jsonl"),
    "amc23": Preset("math-ai/amc23", "test", Fields("question", "answer", "id"), "amc23/test.jsonl"),
    "math": Preset("nlile/hendrycks-MATH-benchmark", "train", Fields("problem", "answer", "unique_id")),
    "numina": Preset("AI-MO/NuminaMath-1.5", "train", Fields("problem", "answer", None)),
    "openr1-math": Preset("open-r1/OpenR1-Math-220k", "train", Fields("problem", "answer", "uuid"), config="default"),
}
# The local copies of AMC23 name the problem `problem` (their `question` duplicates it).
_LOCAL_FIELDS = {"amc23": Fields("problem", "answer", "id")}


@dataclass
class LoadResult:
    problems: list[Problem]
    skipped: list[str]  # "file:line: why" for each row skipped with on_bad_row="skip"


def load_problems(
    spec: str | Path,
    *,
    fields: Fields | None = None,
    data_dir: str | Path | None = None,
    on_bad_row: OnBadRow = "error",
    limit: int | None = None,
) -> LoadResult:
    """Problems from a file path, a preset name or a hub dataset `name[:config][@split]`."""
    spec = str(spec)
    data_dir = data_dir or os.environ.get("DISTILL_DATA_DIR")
    skipped: list[str] = []
    if spec in PRESETS:
        preset = PRESETS[spec]
        local = Path(data_dir) / preset.local if data_dir and preset.local else None
        if local is not None and local.is_file():
            rows = _file_rows(local, on_bad_row, skipped)
            chosen = fields or _LOCAL_FIELDS.get(spec, preset.fields)
        else:
            rows = _hub_rows(preset.hub, preset.config, preset.split, spec)
            chosen = fields or preset.fields
        problems = _to_problems(rows, chosen, spec, preset.reference, on_bad_row, skipped, limit)
    elif Path(spec).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv") or Path(spec).exists():
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        problems = _to_problems(_file_rows(path, on_bad_row, skipped), fields or Fields(), path.name, "plain", on_bad_row, skipped, limit)
    elif "/" in spec:
        name, config, split = parse_hub_spec(spec)
        problems = _to_problems(_hub_rows(name, config, split, spec), fields or Fields(), name, "plain", on_bad_row, skipped, limit)
    else:
        raise InputError(
            f"'{spec}' is neither a file, a preset ({', '.join(PRESETS)}) nor a hub dataset name[:config][@split]"
        )
    if not problems:
        raise InputError(f"{spec}: no problems to read (all rows were skipped or the source is empty)")
    return LoadResult(problems, skipped)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """'org/name[:config][@split]' -> (name, config, split); split defaults to 'train'."""
    match = re.fullmatch(r"([^:@\s]+/[^:@\s]+)(?::([^@\s]+))?(?:@(\S+))?", spec)
    if not match:
        raise InputError(f"'{spec}': a hub dataset is written org/name[:config][@split]")
    return match.group(1), match.group(2), match.group(3) or "train"


def gsm8k_reference(answer: str) -> str:
    """GSM8K writes its worked solution then '#### 72'; the reference is what follows ####."""
    _, sep, final = answer.rpartition("####")
    return final.strip().replace(",", "") if sep else answer.strip()


def shard_of(problem_id: str, count: int) -> int:
    """Which of `count` shards a problem belongs to: by a hash of its id, so every machine
    computes the same split whatever order it read the rows in."""
    return int(hashlib.sha256(problem_id.encode("utf-8")).hexdigest()[:8], 16) % count


def select_shard(problems: Sequence[Problem], index: int, count: int) -> list[Problem]:
    if not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: the index runs from 0 to {count - 1}")
    return [p for p in problems if shard_of(p.id, count) == index]


# --------------------------------------------------------------------------------------------
# internals


def _file_rows(path: Path, on_bad_row: OnBadRow, skipped: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
            rows = json.loads(path.read_text(encoding="utf-8"))
            for number, row in enumerate(rows, start=1):
                yield f"{path}:item {number}", row
            return
        for number, row in iter_jsonl(path, on_bad_row, skipped):
            yield f"{path}:{number}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a readable Parquet file ({error})") from None
        for number, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {number}", row
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield f"{path}:{number}", row
    else:
        raise InputError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .parquet or .csv")


def _hub_rows(name: str, config: str | None, split: str, spec: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{spec}: reading hub datasets needs the 'datasets' package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, missing dataset, bad split: all end the same way for the user
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"{spec}: could not load hub dataset {name}{':' + config if config else ''}@{split} ({first[:160]}); "
            "check the name and network, or pass a local file / set --data-dir to a local copy"
        ) from None
    for number, row in enumerate(dataset, start=1):
        yield f"{name}@{split}:row {number}", row


def _to_problems(
    rows: Iterator[tuple[str, dict[str, Any]]],
    fields: Fields,
    source: str,
    reference: str,
    on_bad_row: OnBadRow,
    skipped: list[str],
    limit: int | None,
) -> list[Problem]:
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}
    for where, row in rows:
        try:
            problem = _to_problem(row, where, fields, source, reference)
            if problem.id in first_seen:
                raise InputError(f"{where}: duplicate id '{problem.id}' (first at {first_seen[problem.id]})")
        except InputError as error:
            if on_bad_row == "skip":
                skipped.append(str(error))
                continue
            raise InputError(f"{error}; fix the row or pass --on-bad-row skip") from None
        first_seen[problem.id] = where
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _to_problem(row: dict[str, Any], where: str, fields: Fields, source: str, reference: str) -> Problem:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected an object with a '{fields.problem}' field")
    if fields.problem not in row:
        raise InputError(f"{where}: missing field '{fields.problem}' (fields here: {', '.join(map(str, row))}); map it with fields.problem=<name>")
    text = row[fields.problem]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: empty problem in field '{fields.problem}'")
    answer = None
    if fields.answer is not None:
        if fields.answer not in row:
            raise InputError(f"{where}: missing field '{fields.answer}' (the reference answer); map it with fields.answer=<name>")
        answer = answer_text(row[fields.answer])
        if answer is not None and reference == "gsm8k":
            answer = gsm8k_reference(answer)
    raw_id = row.get(fields.id) if fields.id else None
    problem_id = str(raw_id) if raw_id not in (None, "") else stable_id(text)
    return Problem(id=problem_id, problem=text, answer=answer, source=source)

"""The trace record: one teacher completion for one (problem_id, sample_idx), with its provenance.

Written by `distill generate` as append-only JSONL (flushed and fsynced in small batches, a
torn last line repaired on resume), read by `distill filter` and anything else, exported to
Parquet with a chat `messages` column that `datasets.load_dataset("parquet", ...)` and common
SFT tools read as is. The schema is documented in docs/records.md; keep the two in step.

Reading also accepts the minimal form users bring from elsewhere: `problem`, `answer`,
`completion` (and optionally `id`, `finish_reason`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from distill.errors import InputError

SCHEMA_VERSION = 1
TRACE_GLOB = "traces*.jsonl"  # a generate run dir holds traces.jsonl or traces.shard-I-of-N.jsonl
OnBadRow = Literal["error", "skip"]
READ_BATCH = 1024  # Parquet rows decoded at a time when reading
ROW_GROUP_ROWS = 1024  # Parquet rows per row group when writing: readers stream one group at a time
ROW_GROUP_BYTES = 64 << 20  # ... and fewer when their text passes this many bytes (32k-token traces)


@dataclass
class TraceRecord:
    problem_id: str
    sample_idx: int
    problem: str
    answer: str | None  # the reference answer; None when the source has none
    completion: str  # the whole assistant text, "<think> ... </think>" included
    source: str | None = None  # where the problem came from, e.g. "math500" or a file name
    prompt: list[dict[str, str]] | None = None  # the chat messages sent, before the assistant turn
    finish_reason: str | None = None  # "stop" | "length" | engine-specific
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    teacher: str | None = None  # model id or path
    engine: str | None = None  # "vllm" | "openai" | "hf"
    engine_version: str | None = None
    sampling: dict[str, Any] | None = None  # temperature, top_p, max_tokens, n, ...
    seed: int | None = None  # the seed of this very sample
    created_at: str | None = None  # ISO 8601, UTC
    # The teacher's top-k log-probs of each generated token (`generate top_logprobs=k`): a
    # reference {file, offset, tokens, k} into a binary sidecar (distill/topk.py); None without.
    top_logprobs: dict[str, Any] | None = None
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # fields of the source row we do not model

    @property
    def id(self) -> str:
        return record_id(self.problem_id, self.sample_idx)

    @property
    def key(self) -> tuple[str, int]:
        return (self.problem_id, self.sample_idx)

    def to_json(self) -> dict[str, Any]:
        data = {"id": self.id, **dataclasses.asdict(self)}
        if not data["extra"]:
            del data["extra"]
        if data["top_logprobs"] is None:  # records without top-k are as they always were
            del data["top_logprobs"]
        return data

    def messages(self) -> list[dict[str, str]]:
        """The conversation to train on: the prompt as sent, then the complete assistant text."""
        prompt = self.prompt or [{"role": "user", "content": self.problem}]
        return [*prompt, {"role": "assistant", "content": self.completion}]


_FIELDS = {f.name for f in dataclasses.fields(TraceRecord)}
_REQUIRED = ("problem", "completion")


def record_id(problem_id: str, sample_idx: int) -> str:
    return f"{problem_id}/{sample_idx}"


def stable_id(problem: str) -> str:
    """An id derived from the problem text alone (whitespace-insensitive), stable across runs."""
    normalised = re.sub(r"\s+", " ", problem).strip()
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# reading


def iter_jsonl(path: str | Path, on_bad_row: OnBadRow = "error", skipped: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a malformed line names file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as error:
                message = f"{path}:{number}: malformed JSON line ({_short(error)})"
                if on_bad_row == "skip":
                    if skipped is not None:
                        skipped.append(message)
                    continue
                raise InputError(message + "; fix the line or pass --on-bad-row skip") from None
            yield number, obj


def trace_files(path: str | Path) -> list[Path]:
    """The trace files behind a path: a file as is, or every shard of a generate run directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(TRACE_GLOB))
        if not files:
            raise InputError(f"{path}: no {TRACE_GLOB} in this directory; is it a `distill generate` run directory?")
        return files
    if not path.exists():
        raise InputError(f"{path}: file not found")
    return [path]


@dataclass
class ReadResult:
    records: list[TraceRecord]
    skipped: list[str]  # one message per skipped row, "file:line: why"


def read_traces(path: str | Path, on_bad_row: OnBadRow = "error") -> ReadResult:
    """All trace records under `path` (JSONL, Parquet, or a run directory with shards), in memory;
    `iter_traces` streams them."""
    skipped: list[str] = []
    return ReadResult(list(iter_traces(path, on_bad_row, skipped)), skipped)


def iter_traces(path: str | Path, on_bad_row: OnBadRow = "error", skipped: list[str] | None = None) -> Iterator[TraceRecord]:
    """The trace records under `path`, streamed (a few batches of rows in memory at a time). With
    on_bad_row="skip" a bad row is appended to `skipped` ("file:line: why") and passed over."""
    from distill.topk import resolve_reference

    skipped = skipped if skipped is not None else []
    for file in trace_files(path):
        for where, row in _rows(file, on_bad_row, skipped):
            try:
                record = record_from_row(row, where)
                # A sidecar named relative to its trace file is found beside it, wherever the reader runs.
                record.top_logprobs = resolve_reference(record.top_logprobs, file.parent)
                yield record
            except InputError as error:
                if on_bad_row == "skip":
                    skipped.append(str(error))
                    continue
                raise InputError(f"{error}; fix the row or pass --on-bad-row skip") from None


def record_from_row(row: dict[str, Any], where: str) -> TraceRecord:
    """A TraceRecord from a full record or the minimal form; `where` is 'file:line' for errors."""
    for name in _REQUIRED:
        if name not in row or row[name] is None:
            raise InputError(f"{where}: missing field '{name}' (a trace needs at least 'problem', 'answer' and 'completion')")
        if not isinstance(row[name], str):
            raise InputError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
    if "answer" not in row:
        raise InputError(f"{where}: missing field 'answer' (the reference answer; null when there is none)")
    problem = row["problem"]
    problem_id = row.get("problem_id")
    sample_idx = row.get("sample_idx")
    if problem_id is None:
        # Minimal form: an `id` names the problem; samples of one problem share it.
        problem_id = str(row["id"]) if row.get("id") is not None else stable_id(problem)
    if sample_idx is None:
        sample_idx = 0
    if not isinstance(sample_idx, int) or isinstance(sample_idx, bool) or sample_idx < 0:
        raise InputError(f"{where}: field 'sample_idx' must be a non-negative integer, got {sample_idx!r}")
    answer = row["answer"]
    known = {k: row[k] for k in _FIELDS if k in row}
    for name in ("prompt", "sampling"):
        if isinstance(known.get(name), str):  # Parquet export stores these as JSON text
            known[name] = json.loads(known[name])
    if known.get("top_logprobs") is not None:
        from distill.topk import parse_reference

        known["top_logprobs"] = parse_reference(known["top_logprobs"], where)
    extra = {k: v for k, v in row.items() if k not in _FIELDS and k not in ("id", "messages")}
    extra.update(known.pop("extra", None) or {})
    return TraceRecord(
        **{**known, "problem_id": str(problem_id), "sample_idx": sample_idx, "problem": problem,
           "answer": answer_text(answer)},
        extra=extra,
    )


def answer_text(answer: Any) -> str | None:
    """A reference answer as text: they come as strings, ints (AIME) or floats (AMC: 27.0);
    keep "27", not "27.0"."""
    if answer is None:
        return None
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def _rows(file: Path, on_bad_row: OnBadRow, skipped: list[str]) -> Iterator[tuple[str, dict]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(file)
        except Exception as error:  # pyarrow raises several types for a bad file
            raise InputError(f"{file}: not a readable Parquet file ({_short(error)})") from None
        number = 0
        for batch in handle.iter_batches(batch_size=READ_BATCH):  # one batch decoded at a time
            for row in batch.to_pylist():
                number += 1
                yield f"{file}:row {number}", row
    elif file.suffix in (".jsonl", ".json"):
        for number, row in iter_jsonl(file, on_bad_row, skipped):
            yield f"{file}:{number}", row
    else:
        raise InputError(f"{file}: unsupported trace file type '{file.suffix}'; use .jsonl or .parquet")


# --------------------------------------------------------------------------------------------
# writing


class TraceWriter:
    """Append-only JSONL writer that survives kill -9: each batch is flushed and fsynced, and a
    torn last line (a write cut short) is cut off when the file is opened again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def done_keys(self) -> set[tuple[str, int]]:
        """(problem_id, sample_idx) of every record written so far (streamed: only keys are kept)."""
        return {r.key for r in iter_traces(self.path)} if self.path.stat().st_size else set()

    def write(self, records: Iterable[TraceRecord]) -> int:
        lines = [json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records]
        if lines:
            self._handle.write("".join(lines))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        return len(lines)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no trailing newline) off a JSONL file; returns bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - 1))
        if handle.read(1) == b"\n":
            return 0
        # Walk back to the last newline; everything after it is the torn write.
        position = size
        chunk = 1 << 16
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            block = handle.read(position - start)
            index = block.rfind(b"\n")
            if index >= 0:
                keep = start + index + 1
                break
            position = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
        return size - keep


def write_parquet(records: Iterable[TraceRecord], path: str | Path, extra_columns: dict[str, list] | None = None) -> int:
    """Export records with a `messages` column (list of {role, content}); written atomically, in
    bounded row groups (ParquetSink streams when the records do not all fit in memory)."""
    import pyarrow as pa

    records = list(records)
    extra_columns = extra_columns or {}
    for name, values in extra_columns.items():
        if len(values) != len(records):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(records)} records")
    with ParquetSink(path, {name: pa.array(values).type for name, values in extra_columns.items()}) as sink:
        for start in range(0, len(records), ROW_GROUP_ROWS):
            end = start + ROW_GROUP_ROWS
            sink.write(records[start:end], {name: values[start:end] for name, values in extra_columns.items()})
    return len(records)


class ParquetSink:
    """Records (plus extra columns of the given Arrow types) appended to a Parquet file in row
    groups of at most ROW_GROUP_ROWS rows or about ROW_GROUP_BYTES of text, so neither the writer
    nor a reader ever holds more than one group. Written to PATH.tmp and renamed on a clean close."""

    def __init__(self, path: str | Path, extra_types: dict[str, Any] | None = None):
        import pyarrow as pa

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._extra_types = dict(extra_types or {})
        self._schema = pa.schema([*_record_schema(), *self._extra_types.items()])
        self._writer: Any = None
        self._records: list[TraceRecord] = []
        self._extra: dict[str, list] = {name: [] for name in self._extra_types}
        self._bytes = 0
        self.rows = 0

    def write(self, records: Sequence[TraceRecord], extra_columns: dict[str, Sequence] | None = None) -> None:
        extra_columns = extra_columns or {}
        if set(extra_columns) != set(self._extra_types):
            raise ValueError(f"extra columns {sorted(extra_columns)} differ from the sink's {sorted(self._extra_types)}")
        for name, values in extra_columns.items():
            if len(values) != len(records):
                raise ValueError(f"extra column {name!r} has {len(values)} values for {len(records)} records")
            self._extra[name].extend(values)
        for record in records:
            self._records.append(record)
            self._bytes += len(record.completion) + len(record.problem)
            if len(self._records) >= ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
                self._flush(len(self._records))

    def _flush(self, count: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._records:
            return
        records, self._records = self._records[:count], self._records[count:]
        columns = _record_columns(records)
        for name, kind in self._extra_types.items():
            columns[name] = pa.array(self._extra[name][:count], kind)
            self._extra[name] = self._extra[name][count:]
        self._bytes = sum(len(r.completion) + len(r.problem) for r in self._records)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self._schema)
        self._writer.write_table(pa.table(columns, schema=self._schema), row_group_size=len(records))
        self.rows += len(records)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flush(len(self._records))
        if self._writer is None:  # no rows: still a valid file with the schema
            self._writer = pq.ParquetWriter(self._tmp, self._schema)
            self._writer.write_table(pa.table({f.name: pa.array([], f.type) for f in self._schema}, schema=self._schema))
        self._writer.close()
        self._tmp.replace(self.path)

    def __enter__(self) -> "ParquetSink":
        return self

    def __exit__(self, kind, *exc: object) -> None:
        if kind is None:
            self.close()
            return
        if self._writer is not None:  # an error: leave no half-written file behind
            self._writer.close()
        self._tmp.unlink(missing_ok=True)


def _record_schema() -> list[tuple[str, Any]]:
    import pyarrow as pa

    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    text, integer = pa.string(), pa.int64()
    return [
        ("id", text), ("messages", message_type), ("problem_id", text), ("sample_idx", integer), ("problem", text),
        ("answer", text), ("completion", text), ("source", text), ("prompt", text), ("finish_reason", text),
        ("prompt_tokens", integer), ("completion_tokens", integer), ("teacher", text), ("engine", text),
        ("engine_version", text), ("sampling", text), ("seed", integer), ("created_at", text), ("schema", integer),
        ("top_logprobs", text),
    ]  # fmt: skip


def _record_columns(records: Sequence[TraceRecord]) -> dict[str, Any]:
    import pyarrow as pa

    types = dict(_record_schema())
    values: dict[str, list] = {
        "id": [r.id for r in records],
        "messages": [r.messages() for r in records],
        "prompt": [json.dumps(r.prompt) if r.prompt is not None else None for r in records],
        "sampling": [json.dumps(r.sampling) if r.sampling is not None else None for r in records],
        "top_logprobs": [json.dumps(r.top_logprobs) if r.top_logprobs is not None else None for r in records],
    }
    for name in types:
        if name not in values:
            values[name] = [getattr(r, name) for r in records]
    return {name: pa.array(values[name], types[name]) for name in types}


def _short(error: BaseException, limit: int = 120) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

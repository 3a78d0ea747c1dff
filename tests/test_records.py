"""Trace records: append-only JSONL that survives a torn write, minimal-form reading, Parquet export."""

from __future__ import annotations

import json

import pytest

from distill.errors import InputError
from distill.records import TraceRecord, TraceWriter, read_traces, stable_id, write_parquet


def make(i: int, sample: int = 0) -> TraceRecord:
    return TraceRecord(
        problem_id=f"p{i}", sample_idx=sample, problem=f"What is {i}+{i}?", answer=str(2 * i),
        completion=f"<think>\n{i}+{i}={2 * i}\n</think>\n\nThe answer is $\\boxed{{{2 * i}}}$.",
        source="unit", prompt=[{"role": "user", "content": f"What is {i}+{i}? Please reason step by step."}],
        finish_reason="stop", prompt_tokens=12, completion_tokens=20, teacher="tiny", engine="hf",
        engine_version="5.0", sampling={"temperature": 0.6, "top_p": 0.95}, seed=123, created_at="2026-01-01T00:00:00Z",
    )


def test_jsonl_round_trip_and_resume_keys(tmp_path):
    path = tmp_path / "traces.jsonl"
    with TraceWriter(path) as writer:
        writer.write([make(1), make(1, 1), make(2)])
    records = read_traces(path).records
    assert records == [make(1), make(1, 1), make(2)]
    assert json.loads(path.read_text().splitlines()[0])["id"] == "p1/0"
    with TraceWriter(path) as writer:
        assert writer.done_keys() == {("p1", 0), ("p1", 1), ("p2", 0)}


def test_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "traces.jsonl"
    with TraceWriter(path) as writer:
        writer.write([make(1), make(2)])
    with path.open("a") as handle:
        handle.write(json.dumps(make(3).to_json())[:40])  # a write cut short by kill -9
    with pytest.raises(InputError, match=r"traces\.jsonl:3: malformed JSON line"):
        read_traces(path)
    with TraceWriter(path) as writer:
        assert writer.done_keys() == {("p1", 0), ("p2", 0)}
        writer.write([make(3)])
    assert [r.problem_id for r in read_traces(path).records] == ["p1", "p2", "p3"]


def test_minimal_form_and_bad_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1?", "answer": 2, "completion": "<think>x</think> \\boxed{2}"}) + "\n"
        + json.dumps({"problem": "2+2?", "answer": None, "completion": "4", "id": "q7", "score": 1}) + "\n"
        + "{not json\n"
        + json.dumps({"problem": "3+3?", "completion": "6"}) + "\n"
    )
    with pytest.raises(InputError, match=r"mine\.jsonl:3: malformed JSON line"):
        read_traces(path)
    result = read_traces(path, on_bad_row="skip")
    assert len(result.records) == 2 and len(result.skipped) == 2
    assert "mine.jsonl:4: missing field 'answer'" in result.skipped[1]
    first, second = result.records
    assert first.problem_id == stable_id("1+1?") == stable_id("  1+1? ") and first.answer == "2"
    assert second.problem_id == "q7" and second.answer is None and second.extra == {"score": 1}


def test_parquet_messages_readable_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [make(1), make(2, 3)]
    path = tmp_path / "accepted.parquet"
    write_parquet(records, path, extra_columns={"verdict": ["ok", "ok"]})
    dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    row = dataset[1]
    assert row["messages"][-1] == {"role": "assistant", "content": records[1].completion}
    assert row["messages"][0]["role"] == "user" and row["id"] == "p2/3"
    back = read_traces(path).records
    assert back[0].sampling == records[0].sampling and back[1].prompt == records[1].prompt
    assert back[0].extra == {"verdict": "ok"}


def test_run_directory_of_shards(tmp_path):
    with TraceWriter(tmp_path / "traces.shard-0-of-2.jsonl") as writer:
        writer.write([make(1)])
    with TraceWriter(tmp_path / "traces.shard-1-of-2.jsonl") as writer:
        writer.write([make(2)])
    assert [r.problem_id for r in read_traces(tmp_path).records] == ["p1", "p2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no traces\*\.jsonl in this directory"):
        read_traces(empty)
    with pytest.raises(InputError, match="missing.jsonl: file not found"):
        read_traces(tmp_path / "missing.jsonl")


def test_parquet_is_written_in_bounded_row_groups_and_read_back_streamed(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill import records as records_module
    from distill.records import ParquetSink, iter_traces

    monkeypatch.setattr(records_module, "ROW_GROUP_ROWS", 100)
    records = [TraceRecord(f"p{i}", 0, f"problem {i}", str(i), f"<think>x</think> {i}") for i in range(250)]
    path = tmp_path / "out.parquet"
    write_parquet(records, path, extra_columns={"n": list(range(250))})
    handle = pq.ParquetFile(path)
    assert [handle.metadata.row_group(g).num_rows for g in range(handle.num_row_groups)] == [100, 100, 50]
    assert [r.problem_id for r in iter_traces(path)] == [f"p{i}" for i in range(250)]

    monkeypatch.setattr(records_module, "ROW_GROUP_BYTES", 200)  # long texts: smaller groups
    with ParquetSink(tmp_path / "sink.parquet", {"ok": pa.bool_()}) as sink:
        for start in range(0, 250, 7):
            sink.write(records[start : start + 7], {"ok": [True] * len(records[start : start + 7])})
    handle = pq.ParquetFile(tmp_path / "sink.parquet")
    assert handle.metadata.num_rows == 250 and max(handle.metadata.row_group(g).num_rows for g in range(handle.num_row_groups)) <= 10
    with ParquetSink(tmp_path / "empty.parquet", {"ok": pa.bool_()}):
        pass
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    with pytest.raises(RuntimeError), ParquetSink(tmp_path / "broken.parquet") as sink:
        sink.write(records)
        raise RuntimeError("crash mid-export")
    assert not list(tmp_path.glob("broken.parquet*")), "no half-written file is left"

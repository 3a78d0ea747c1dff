"""Problem loading: local files of every format, presets from ../shared/data/eval, bad rows."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path
from distill.errors import InputError
from distill.problems import Fields, gsm8k_reference, load_problems, parse_hub_spec, select_shard, shard_of
from distill.records import stable_id

COUNTS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_presets_read_the_local_copies(name):
    data_dir = shared_path("eval")
    problems = load_problems(name, data_dir=data_dir).problems
    assert len(problems) == COUNTS[name]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.problem.strip() and p.answer for p in problems)
    assert all(p.source == name for p in problems)


def test_preset_answers_are_references():
    data_dir = shared_path("eval")
    assert load_problems("gsm8k", data_dir=data_dir).problems[0].answer == "18"  # "... #### 18"
    assert load_problems("amc23", data_dir=data_dir).problems[0].answer == "27"  # 27.0 in the file
    assert load_problems("aime25", data_dir=data_dir).problems[0].answer == "70"
    assert load_problems("math500", data_dir=data_dir).problems[0].id == "test/precalculus/807.json"


def test_local_formats_and_stable_ids(tmp_path):
    rows = [{"problem": "1+1?", "answer": 2}, {"problem": "2+2?", "answer": "4", "id": "b"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text("problem,answer\n1+1?,2\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["3+3?"], "gold": ["6"]}), tmp_path / "p.parquet")
    jsonl = load_problems(tmp_path / "p.jsonl").problems
    assert [(p.id, p.answer) for p in jsonl] == [(stable_id("1+1?"), "2"), ("b", "4")]
    assert load_problems(tmp_path / "p.csv").problems[0].id == jsonl[0].id
    parquet = load_problems(tmp_path / "p.parquet", fields=Fields("question", "gold", None)).problems
    assert parquet[0].answer == "6" and parquet[0].source == "p.parquet"


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"problem": "a", "answer": 1, "id": "x"}) + "\n"
        + json.dumps({"problem": "  ", "answer": 1}) + "\n"
        + json.dumps({"problem": "b", "answer": 2, "id": "x"}) + "\n"
        + json.dumps({"question": "c", "answer": 3}) + "\n"
    )
    with pytest.raises(InputError, match=r"bad\.jsonl:2: empty problem"):
        load_problems(path)
    result = load_problems(path, on_bad_row="skip")
    assert [p.id for p in result.problems] == ["x"]
    assert "bad.jsonl:3: duplicate id 'x' (first at" in result.skipped[1]
    assert "bad.jsonl:4: missing field 'problem'" in result.skipped[2]
    with pytest.raises(InputError, match="file not found"):
        load_problems(tmp_path / "none.jsonl")
    with pytest.raises(InputError, match="neither a file, a preset"):
        load_problems("nonsense")


def test_hub_spec_and_offline_message():
    assert parse_hub_spec("AI-MO/NuminaMath-1.5") == ("AI-MO/NuminaMath-1.5", None, "train")
    assert parse_hub_spec("openai/gsm8k:main@test") == ("openai/gsm8k", "main", "test")
    with pytest.raises(InputError, match="could not load hub dataset no-such/dataset@train"):
        load_problems("no-such/dataset")


def test_shards_partition_deterministically():
    ids = [f"p{i}" for i in range(200)]
    from distill.problems import Problem

    problems = [Problem(i, "x", "1", "t") for i in ids]
    parts = [select_shard(problems, k, 3) for k in range(3)]
    assert sorted(p.id for part in parts for p in part) == sorted(ids)
    assert all(len(part) > 40 for part in parts)
    assert shard_of("p7", 3) == shard_of("p7", 3)
    assert gsm8k_reference("so 1,000 #### 1,000") == "1000"

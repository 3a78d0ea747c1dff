"""Benchmark loading: every file of ../shared/data/eval, default k, user JSONL, bad specs."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path
from distill.benchmarks import DEFAULT_K, USER_DEFAULT_K, load_benchmark, load_benchmarks, parse_spec
from distill.errors import ConfigError, InputError
from distill.problems import Fields

COUNTS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}


def test_every_file_of_the_eval_data_is_read_and_counted():
    data_dir = shared_path("eval")
    files = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*.jsonl"))
    read = {}
    for name, count in COUNTS.items():
        benchmark = load_benchmark(name, data_dir=data_dir)
        assert len(benchmark.problems) == count, name
        assert benchmark.default_k == DEFAULT_K[name]
        assert all(p.answer for p in benchmark.problems)
        read[f"{name}/test.jsonl"] = benchmark
    # The other two files: GSM8K's training split (a training set, refused as a benchmark but
    # read through its problems preset) and QwQ's copy of AIME 2025, whose `prompt` holds the problem.
    with pytest.raises(ConfigError, match="training set"):
        load_benchmark("gsm8k-train", data_dir=data_dir)
    train = data_dir / "gsm8k/train.jsonl"
    assert len(load_benchmark(f"gsm8k_train={train}", fields=Fields("question", "answer", None)).problems) == 7473
    qwq = load_benchmark(str(data_dir / "aime25/qwq_aime25.jsonl"), fields=Fields("prompt", "answer", None))
    assert len(qwq.problems) == 30 and qwq.default_k == USER_DEFAULT_K
    assert [p.answer for p in qwq.problems] == [p.answer for p in read["aime25/test.jsonl"].problems]
    assert files == sorted([*read, "gsm8k/train.jsonl", "aime25/qwq_aime25.jsonl"]), "a file in eval/ is not covered"


def test_limit_and_problem_set_hash():
    data_dir = shared_path("eval")
    small = load_benchmark("math500", data_dir=data_dir, limit=5)
    assert len(small.problems) == 5
    assert small.problem_set == load_benchmark("math500", data_dir=data_dir, limit=5).problem_set
    assert small.problem_set != load_benchmark("math500", data_dir=data_dir, limit=6).problem_set


def test_user_jsonl_benchmarks(tmp_path):
    path = tmp_path / "olymp.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(3)))
    benchmark = load_benchmark(str(path))
    assert benchmark.name == "olymp" and len(benchmark.problems) == 3 and benchmark.default_k == USER_DEFAULT_K
    assert load_benchmark(f"mine={path}").name == "mine"
    assert parse_spec("math500") == ("math500", "math500")
    with pytest.raises(ConfigError, match="named twice"):
        load_benchmarks([str(path), f"olymp={path}"])
    no_answer = tmp_path / "open.jsonl"
    no_answer.write_text(json.dumps({"problem": "why?", "answer": None}) + "\n")
    with pytest.raises(InputError, match="no reference answer"):
        load_benchmark(str(no_answer))
    with pytest.raises(InputError, match="neither a benchmark"):
        load_benchmark("aime26")

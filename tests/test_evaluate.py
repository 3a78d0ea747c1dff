"""`distill eval` end to end on a tiny model with the hf engine: files, metrics, environment,
resume after a crash, the locked protocol, and a rescore that reproduces the metrics."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path
from distill.errors import ConfigError
from distill.evaluate import EvalConfig, read_protocol, run, samples_path
from distill.teacher.generate import HFOptions, sample_seed
from distill.records import read_traces

FIGURES = ("pass@1", "pass@1_se", "pass@1_ci95", "cons@k", "pass@k", "response_tokens_mean",
           "response_tokens_median", "truncation_rate", "format_failure_rate")


def tiny_eval(tiny_qwen, out, **changes) -> EvalConfig:
    settings = dict(model=str(tiny_qwen), benchmarks=("math500", "gsm8k"), out=out, engine="hf", k=2, max_tokens=6,
                    limit=2, data_dir=shared_path("eval"), hf=HFOptions(batch_size=8), verifier_workers=1)
    return EvalConfig(**{**settings, **changes})


def test_eval_end_to_end_resume_and_rescore(tiny_qwen, tmp_path, run_cli):
    out = tmp_path / "eval"
    metrics = run(tiny_eval(tiny_qwen, out))

    # every generation and verdict is kept, one record per (problem, sample), with its own seed
    for name in ("math500", "gsm8k"):
        records = read_traces(samples_path(out, name)).records
        assert sorted(r.key for r in records) == sorted((pid, i) for pid in read_protocol(out)["benchmarks"][name]["problem_ids"] for i in range(2))
        for record in records:
            assert record.seed == sample_seed(0, record.problem_id, record.sample_idx)
            assert record.prompt[-1]["content"].endswith("put your final answer within \\boxed{}.")
            assert record.finish_reason in ("stop", "length") and 0 < record.completion_tokens <= 6
            assert set(record.extra) >= {"correct", "extracted", "verdict", "format_ok"}
            assert record.sampling["temperature"] == 0.6 and record.sampling["top_p"] == 0.95
    assert len({r.seed for r in read_traces(samples_path(out, "math500")).records}) == 4

    figures = metrics["benchmarks"]["math500"]
    assert all(key in figures for key in FIGURES) and figures["problems"] == 2 and figures["samples"] == 4 and figures["complete"]
    assert 0.0 <= figures["pass@1_ci95"][0] <= figures["pass@1"] <= figures["pass@1_ci95"][1] <= 1.0
    assert figures["truncation_rate"] > 0.5  # 6 new tokens of a random model rarely stop
    assert sum(figures["verdicts"].values()) == 4
    protocol = metrics["protocol"]
    assert (protocol["temperature"], protocol["top_p"], protocol["max_tokens"], protocol["system_prompt"]) == (0.6, 0.95, 6, None)
    assert protocol["benchmarks"]["gsm8k"]["k"] == 2 and protocol["benchmarks"]["gsm8k"]["limit"] == 2
    environment = metrics["environment"]
    assert environment["engine"] == "hf" and environment["engine_version"] and environment["versions"]["torch"]
    assert environment["versions"]["transformers"] and environment["gpus_used"] == 0 and environment["batch_size"] == 8
    assert environment["resolved_dtype"] == "torch.float32"
    assert metrics["cpu_hours"] > 0 and metrics["gpu_hours"] == 0 and metrics["generation_wall_time_s"] > 0
    ledger = metrics["compute"]  # its own inference, reported apart from what making the model cost
    stored = [r for name in ("math500", "gsm8k") for r in read_traces(samples_path(out, name)).records]
    assert ledger["counts_as"] == "inference" and ledger["student_tokens_generated"] == sum(r.completion_tokens for r in stored)
    assert ledger["student_prompt_tokens"] == sum(r.prompt_tokens for r in stored)
    assert ledger["flops_total"] == 2 * ledger["student_params"] * (ledger["student_prompt_tokens"] + ledger["student_tokens_generated"]) > 0
    assert json.loads((out / "metrics.json").read_text())["benchmarks"] == metrics["benchmarks"]

    # rescore (command line): the same verdicts and figures, nothing generated
    before = samples_path(out, "math500").read_bytes()
    code, _, err = run_cli("eval", "--rescore", str(out), "verifier_workers=1")
    assert code == 0 and "0 verdict(s) changed" in err, err
    rescored = json.loads((out / "metrics.json").read_text())
    assert rescored["benchmarks"] == metrics["benchmarks"] and rescored["rescored"]["verdicts_changed"] == 0
    assert samples_path(out, "math500").read_bytes() == before

    # the protocol is locked on resume (refused before any model loads)
    with pytest.raises(ConfigError, match=r"temperature: 0\.6 -> 1\.0"):
        run(tiny_eval(tiny_qwen, out, temperature=1.0))
    with pytest.raises(ConfigError, match=r"gsm8k: k 2 -> 1"):
        run(tiny_eval(tiny_qwen, out, k=None))  # GSM8K's default k is 1

    # crash: the last record of one file torn in half; the same command redoes only that sample
    path = samples_path(out, "gsm8k")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    lost = json.loads(lines[-1])
    code, _, err = run_cli("eval", "--model", str(tiny_qwen), "--benchmarks", "math500,gsm8k", "--engine", "hf", "--k", "2",
                           "--max-tokens", "6", "--limit", "2", "--data-dir", str(shared_path("eval")), "--out", str(out),
                           "hf.batch_size=8", "verifier_workers=1")
    assert code == 0, err
    assert "resuming: 7 of 8 samples already done" in err and "gsm8k: pass@1" in err
    records = read_traces(path).records
    assert len(records) == 4 and records[-1].key == (lost["problem_id"], lost["sample_idx"])
    assert [r.completion for r in records[:3]] == [json.loads(l)["completion"] for l in lines[:3]]
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["benchmarks"]["math500"] == metrics["benchmarks"]["math500"]
    assert resumed["environment"]["sessions"] == 2


def test_eval_cli_errors(tmp_path, run_cli):
    code, _, err = run_cli("eval", "--benchmarks", "aime24", "--out", str(tmp_path / "x"))
    assert code == 2 and "--model" in err and "Traceback" not in err
    code, _, err = run_cli("eval", "--model", "m", "--benchmarks", "aime26", "--out", str(tmp_path / "x"))
    assert code == 2 and "neither a benchmark" in err
    code, _, err = run_cli("eval", "--rescore", str(tmp_path))
    assert code == 2 and "protocol.json: not found" in err

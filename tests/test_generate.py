"""distill generate end to end on a tiny model: records and provenance, the R1 `<think>` prefill,
resume after kill -9, refused setting changes, shards, bad rows, and clear errors before work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import shared_path
from distill.problems import shard_of
from distill.records import read_traces
from distill.teacher.generate import GenerateConfig, run, sample_seed
from openai_server import FakeOpenAIServer, closed_port_url

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [  # ids chosen so that --shard I/2 splits them 2 + 2
    {"id": "a", "problem": "What is 1+1?", "answer": "2"},
    {"id": "c", "problem": "What is 2+3?", "answer": 5},
    {"problem": "Name a prime larger than 10.", "answer": "11"},  # no id: a stable one is derived
    {"id": "d", "problem": "What is 3*3?", "answer": "9"},
]


def write_problems(path: Path, rows=PROBLEMS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def traces(path: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    keys = [(r["problem_id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (problem_id, sample_idx) is written once"
    return dict(zip(keys, rows))


@pytest.fixture(scope="module")
def reference(tiny_qwen, tmp_path_factory):
    """One uninterrupted, unsharded run that other tests compare against: 4 problems x n=2,
    with the R1-Distill chat template (its prompt ends in "<think>\n")."""
    folder = tmp_path_factory.mktemp("generate")
    data = write_problems(folder / "problems.jsonl")
    r1_template = shared_path("tokenizers/deepseek-r1-distill-qwen/tokenizer_config.json")
    args = ["--model", str(tiny_qwen), "--data", str(data), "--engine", "hf", "--n", "2", "--max-tokens", "4",
            f"chat_template={r1_template}"]
    cfg = GenerateConfig(model=str(tiny_qwen), data=str(data), out=folder / "reference", engine="hf", n=2, max_tokens=4,
                         chat_template=str(r1_template))
    run(cfg)
    return {"out": cfg.out, "args": args, "records": traces(cfg.out / "traces.jsonl")}


def test_records_hold_the_think_prefill_and_their_provenance(reference, tiny_qwen):
    records, out = reference["records"], reference["out"]
    assert len(records) == 8
    for (problem_id, sample_idx), record in records.items():
        # The R1-Distill template ends the prompt with "<think>\n"; the stored completion has it.
        assert record["completion"].startswith("<think>\n")
        assert record["prompt"] == [{"role": "user", "content": record["problem"] + "\nPlease reason step by step, and put your final answer within \\boxed{}."}]
        assert record["teacher"] == str(tiny_qwen) and record["engine"] == "hf"
        assert record["engine_version"].startswith("transformers ")
        assert record["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 4, "n": 2}
        assert record["seed"] == sample_seed(0, problem_id, sample_idx)
        assert record["finish_reason"] in ("stop", "length") and 0 < record["completion_tokens"] <= 4
        assert record["prompt_tokens"] > 0 and record["created_at"] and record["source"] == "problems.jsonl"
    assert {r["answer"] for r in records.values()} == {"2", "5", "11", "9"}
    assert len({r["completion"] for r in records.values()}) == 8, "every sample has its own seed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 8 and sum(metrics["finish_reasons"].values()) == 8
    assert metrics["completion_tokens"] == sum(r["completion_tokens"] for r in records.values())
    assert metrics["wall_time_s"] > 0 and metrics["run"]["samples_per_s"] > 0 and metrics["errors"] == 0
    # the compute ledger: the teacher's N read from its weights, 2N per prompt and sampled token
    ledger, vocab = metrics["compute"], json.loads((tiny_qwen / "config.json").read_text())["vocab_size"]
    assert ledger["teacher_params"] == 18720 + 32 * vocab  # tests/test_compute.py counts it by hand
    assert ledger["teacher_tokens_generated"] == metrics["completion_tokens"] and ledger["teacher_prompt_tokens"] == metrics["prompt_tokens"]
    assert ledger["flops_total"] == 2 * ledger["teacher_params"] * (metrics["prompt_tokens"] + metrics["completion_tokens"])
    assert yaml.safe_load((out / "config.yaml").read_text())["n"] == 2


def test_rerun_skips_done_work_refuses_changed_settings_and_grows_n(reference, run_cli, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    args = ["generate", "--out", str(out), *reference["args"]]
    code, stdout, stderr = run_cli(*args)
    assert code == 0 and "8 samples already in traces.jsonl, nothing to do" in stderr and "8 samples in" in stdout
    assert traces(out / "traces.jsonl") == reference["records"]

    # Another temperature or teacher in the same directory is refused, before any model loads.
    code, _, stderr = run_cli(*args, "--temperature", "0.7")
    assert code == 2 and "temperature: 0.6 -> 0.7" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(*[a if a != reference["args"][1] else str(tmp_path / "other") for a in args])
    assert code == 2 and "model:" in stderr

    # A larger n adds samples and leaves the first ones as they were.
    code, _, stderr = run_cli(*args, "--n", "3", "--data", str(write_problems(tmp_path / "two.jsonl", PROBLEMS[:1])))
    assert code == 0, stderr
    grown = traces(out / "traces.jsonl")
    assert len(grown) == 9 and ("a", 2) in grown
    assert all(grown[key] == record for key, record in reference["records"].items())


def test_a_shard_holds_its_problems_and_reproduces_their_unsharded_samples(reference, run_cli, tmp_path):
    out = tmp_path / "sharded"
    code, _, stderr = run_cli("generate", "--out", str(out), *reference["args"], "--shard", "1/2")
    assert code == 0, stderr
    assert (out / "metrics.shard-1-of-2.json").is_file() and not (out / "metrics.json").exists()
    part = traces(out / "traces.shard-1-of-2.jsonl")
    expected = {k: r["completion"] for k, r in reference["records"].items() if shard_of(k[0], 2) == 1}
    assert len(expected) == 4, "the test problems split 2 + 2"
    assert {k: r["completion"] for k, r in part.items()} == expected
    assert len(read_traces(out).records) == 4  # `distill filter` reads the shards of a run dir


def test_bad_rows_stop_before_work_or_are_counted_when_skipped(tiny_qwen, run_cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "problem": "What is 1+1?", "answer": "2"}\n{"id": "b", "problem": "  ", "answer": "1"}\n{not json\n')
    out = tmp_path / "run"
    args = ["generate", "--model", str(tiny_qwen), "--data", str(data), "--out", str(out), "--engine", "hf", "--n", "1", "--max-tokens", "2"]
    code, _, stderr = run_cli(*args)
    assert code == 2 and f"{data}:" in stderr and "--on-bad-row skip" in stderr and "Traceback" not in stderr
    assert not out.exists(), "nothing is started for bad input"
    code, _, stderr = run_cli(*args, "--on-bad-row", "skip")
    assert code == 0, stderr
    assert json.loads((out / "metrics.json").read_text())["skipped_rows"] == 2
    assert list(traces(out / "traces.jsonl")) == [("a", 0)]
    assert "warning: problem rows skipped as malformed (on_bad_row=skip): 2 of 3" in stderr  # more than 1% of the input
    assert [w["reason"] for w in json.loads((out / "metrics.json").read_text())["warnings"]] == ["malformed"]


@pytest.mark.parametrize("engine, extra, code, message", [
    ("hf", [], 2, "cannot load the tokenizer of"),
    ("vllm", [], 3, "pip install 'distill[gpu]'"),
    ("openai", [f"openai.base_url={closed_port_url()}"], 1, "cannot reach the OpenAI-compatible server"),
])
def test_unusable_teacher_fails_before_any_work(run_cli, tmp_path, monkeypatch, engine, extra, code, message):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without the [gpu] extra
    data = write_problems(tmp_path / "problems.jsonl")
    out = tmp_path / "run"
    got, _, stderr = run_cli("generate", "--model", str(tmp_path / "no-such-teacher"), "--data", str(data), "--out", str(out), "--engine", engine, *extra)
    assert got == code and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_openai_engine_end_to_end_keeps_reasoning_and_no_key(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-secret-123")
    data = write_problems(tmp_path / "problems.jsonl")
    out = tmp_path / "run"
    with FakeOpenAIServer(model="deepseek-reasoner", api_key="sk-secret-123") as server:
        code, _, stderr = run_cli("generate", "--model", "deepseek-reasoner", "--data", str(data), "--out", str(out), "--engine", "openai",
                                  "--n", "3", f"openai.base_url={server.base_url}", "openai.api_key_env=TEACHER_KEY",
                                  "openai.backoff_s=0.01", "openai.max_in_flight=4")
    assert code == 0, stderr
    records = traces(out / "traces.jsonl")
    assert len(records) == 12
    for record in records.values():
        # Split reasoning (even seeds) is folded back; a server-side "<think>" prefill (odd seeds) is repaired.
        assert record["completion"].startswith("<think>\n") and record["completion"].count("</think>") == 1
        assert record["engine"] == "openai" and record["engine_version"] == "fake-1.0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["retries"] > 0 and metrics["samples"] == 12
    for file in out.iterdir():
        assert "sk-secret-123" not in file.read_text(encoding="utf-8"), f"the API key leaked into {file.name}"


def test_resume_after_kill_9_matches_an_uninterrupted_run(reference, run_cli, tmp_path):
    # One row per batch and a flush per record, so the run is killed between writes; neither
    # changes the samples (each has its own seed, whatever its batch).
    args = [*reference["args"], "hf.batch_size=2", "flush_every=1"]
    out = tmp_path / "killed"
    trace_file = out / "traces.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "distill.cli", "generate", "--out", str(out), *args],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if trace_file.exists() and trace_file.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed; give it more work"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = trace_file.read_bytes().count(b"\n")
    assert 1 <= written < 8, "killed mid-run"
    with trace_file.open("a") as handle:
        handle.write('{"id": "d/1", "problem_id": "d", "sample_idx": 1, "completion": "a write cut sh')  # a torn line

    code, _, stderr = run_cli("generate", "--out", str(out), *args)
    assert code == 0, stderr
    assert f"{written} samples already in traces.jsonl, {8 - written} to go" in stderr
    resumed = traces(trace_file)
    assert set(resumed) == set(reference["records"])
    for key, record in reference["records"].items():
        assert resumed[key]["completion"] == record["completion"], key
        assert resumed[key]["seed"] == record["seed"]

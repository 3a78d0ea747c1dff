"""Run directories: config.yaml, metrics.jsonl, metrics.json, a log; locked settings on resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

from distill.errors import ConfigError
from distill.rundir import RunDir, read_config, read_metrics


@dataclasses.dataclass(frozen=True)
class Cfg:
    model: str = "a"
    temperature: float = 0.6
    batch: int = 8


def test_files_written(tmp_path):
    run = RunDir(tmp_path / "run", "unit", Cfg(), {"model": "default"})
    run.log_metrics({"step": 1, "loss": 2.5, "nan": float("nan")})
    run.log_metrics({"step": 2, "loss": 2.0})
    run.say("hello")
    run.write_metrics({"final_loss": 2.0})
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and lines[0]["nan"] is None
    assert read_metrics(tmp_path / "run")["final_loss"] == 2.0
    assert read_config(tmp_path / "run") == {"model": "a", "temperature": 0.6, "batch": 8}
    assert "hello" in (tmp_path / "run" / "unit.log").read_text()


def test_resume_refuses_changed_locked_settings(tmp_path):
    RunDir(tmp_path, "unit", Cfg(), locked=("model", "temperature"))
    RunDir(tmp_path, "unit", Cfg(batch=16), locked=("model", "temperature"))  # batch may change
    with pytest.raises(ConfigError, match=r"other settings \(temperature: 0\.6 -> 1\.0\)"):
        RunDir(tmp_path, "unit", Cfg(temperature=1.0), locked=("model", "temperature"))


def test_step_rows_count_each_step_once_across_resumes(tmp_path):
    run = RunDir(tmp_path / "run", "unit", Cfg())
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "trained_tokens": 10})
    run.log_metrics({"event": "resume", "step": 2})  # events are not steps
    run.log_metrics({"step": 3, "trained_tokens": 12})  # replayed after the resume: the last record counts
    with (tmp_path / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "trained_tok')  # torn by a crash
    rows = run.step_rows()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sum(r["trained_tokens"] for r in rows) == 32 == run.step_total("trained_tokens")


def test_drops_over_one_percent_warn_and_are_recorded(tmp_path, capsys):
    run_dir = RunDir(tmp_path / "run", "train", Cfg())
    assert not run_dir.warn_dropped("too_long", 1, 100, "sequences dropped, longer than max_seq_len=10", "raise max_seq_len")
    assert capsys.readouterr().err == ""
    assert run_dir.warn_dropped("too_long", 2, 100, "sequences dropped, longer than max_seq_len=10", "raise max_seq_len")
    assert capsys.readouterr().err.strip() == "warning: sequences dropped, longer than max_seq_len=10: 2 of 100 (2.0%); raise max_seq_len"
    run_dir.write_metrics({"rows": 100})
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["warnings"] == [{"reason": "too_long", "count": 2, "total": 100, "fraction": 0.02,
                                    "message": "warning: sequences dropped, longer than max_seq_len=10: 2 of 100 (2.0%); raise max_seq_len"}]
    assert "WARNING warning: sequences dropped" in (tmp_path / "run" / "train.log").read_text()

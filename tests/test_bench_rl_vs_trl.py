"""bench/rl_vs_trl.py at its smoke size: the plumbing (workers, results.json, the section), not the figures.

The benchmark itself (docs/benchmarks.md) runs for minutes; this runs one distill and one TRL
trainer for two tiny steps each and checks what the script writes. Timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill import toy  # the smoke size holds out one problem per level

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "rl_vs_trl.py"


def test_help_runs_nothing(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--steps" in done.stdout and "--quick" in done.stdout and "--out" in done.stdout
    assert not any(tmp_path.iterdir()), "--help must not create anything"


@pytest.mark.slow  # ~40 CPU-seconds: two trainers start, train two tiny steps, and three models are sampled
def test_smoke_writes_results_and_section(tmp_path):
    pytest.importorskip("trl", reason="the benchmark's peer side needs trl (pip install trl)")
    pytest.importorskip("psutil", reason="the benchmark's peak-memory probe needs psutil")
    out = tmp_path / "bench"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    command = [sys.executable, str(SCRIPT), "--smoke", "--only", "distill-grpo", "trl-grpo", "--out", str(out), "--write", str(doc)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=290, env={**_env(), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"distill-grpo", "trl-grpo"}
    for name, run in results["runs"].items():
        assert "error" not in run, f"{name}: {run.get('error')} (see {out / (name + '.stderr.txt')})"
        assert [r["step"] for r in run["steps"]] == [1, 2], f"{name}: one record per step"
        assert {"wall_s", "cpu_s", "rollout_s", "update_s"} <= set(run["steps"][1]), f"{name}: step 2 has the split"
        assert run["peak_rss_gb"] > 0
        held_out = run["held_out"]
        assert 0.0 <= held_out["accuracy"] <= 1.0 and held_out["reverse_kl"] >= 0.0 and held_out["samples"] == len(toy.LEVELS)
    assert results["base"]["samples"] == len(toy.LEVELS) and results["versions"]["trl"] != "missing"

    section = (out / "section.md").read_text()
    assert section.startswith("## RL and on-policy distillation vs TRL")
    assert "TRL GRPOTrainer (loss_type grpo)" in section and "`distill grpo`" in section
    assert "Ratios distill / TRL" in section and "2 steps x 2 prompts x 2 completions" in section
    text = doc.read_text()
    assert section.strip() in text and "## Another section\n\nkept" in text, "the section is added beside the others"


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

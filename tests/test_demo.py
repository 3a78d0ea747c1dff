"""`distill demo --quick`: the seven real stages on the toy world complete, and both distillations work.

This is the end-to-end test of the whole pipeline on models that actually reason: the committed
toy teacher samples traces (hf engine), the shared verifier filters them, `distill train` distils
the base student, `distill grpo` trains the RL-only baseline from the same base, `distill eval`
`distill onpolicy` distils the same base on its own samples scored by the teacher, `distill
eval` scores all four on the held-out split and `distill compare` writes the report.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
# about 150 s alone on 2 cores (seven stages, four evals); the limit leaves room for a busy CI machine
@pytest.mark.timeout(600)
def test_quick_demo_completes_and_both_distilled_students_beat_their_base(tmp_path, run_cli):
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli("demo", "--quick", "--out", str(out))
    assert code == 0, stderr[-3000:]

    for stage in ("generate", "filter", "train", "onpolicy", "grpo", "eval-base", "eval-distilled", "eval-onpolicy", "eval-rl"):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["stage"] in stage, f"{stage}/metrics.json was written by the {metrics['stage']} stage"
        assert metrics["compute"]["ledger"] == 1, f"{stage}/metrics.json has no compute ledger"
    for name in ("report.md", "report.csv", "accuracy.png", "accuracy_vs_compute.png"):
        assert (out / "report" / name).stat().st_size > 0, f"compare wrote no {name}"
    assert (out / "filter" / "accepted.parquet").is_file()

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["teacher_samples"] == summary["accepted"] + summary["rejected"]
    assert summary["rejected"] > 0, "the fallible teacher gives the filter something to reject"
    assert summary["accepted"] > summary["rejected"], "the teacher is good: most traces pass"
    scores = summary["pass@1"]
    assert scores["distilled"] > scores["base"], f"the distilled student does not beat its base: {scores}"
    assert scores["on-policy"] > scores["base"], f"the on-policy distilled student does not beat its base: {scores}"
    assert all(name in stdout for name in ("distilled", "on-policy", "rl-only")), "the table is printed"
    op = json.loads((out / "onpolicy" / "metrics.json").read_text())
    assert op["reverse_kl_last10"] < op["reverse_kl_first"], f"on-policy distillation moved the student towards the teacher: {op['reverse_kl_first']} -> {op['reverse_kl_last10']}"
    flops = {row["label"]: row["cost"]["flops"] for row in json.loads((out / "report" / "metrics.json").read_text())["rows"]}
    assert flops["base"] == 0 and all(flops[name] > 0 for name in ("distilled", "on-policy", "rl-only")), f"every trained model's FLOPs are known: {flops}"

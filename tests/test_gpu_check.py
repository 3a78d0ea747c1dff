"""bench/gpu_check.py: its dry run (every section at tiny size on the CPU) and its report.

The figures themselves need the GPU; these tests check that the script the device session runs
works end to end and renders what a GPU run would record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "attention", "liger", "longest", "grpo", "eval", "gpu_tests")


def test_dry_run_runs_every_section_on_cpu_and_writes_json_and_section(tmp_path):
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    result_path = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--workdir", str(tmp_path / "work"), "--json", str(result_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(result_path.read_text())
    assert document["dry_run"] is True and document["environment"]["attention_auto"] == "sdpa_varlen"
    for name in SECTIONS:
        assert document[name]["status"] == "ok", (name, document[name])
    assert document["train"]["tokens_per_s"] > 0 and document["longest"]["longest_tokens"] == 256
    assert document["attention"]["model_packed_vs_alone_max_abs_diff"] < 1e-4, "fp32 on CPU: packed equals one by one"
    assert document["attention"]["layer"]["sdpa_varlen"]["max_abs_diff_vs_fp32"] < 1e-5
    assert document["liger"]["liger-kernel"] == "skipped: needs CUDA"
    assert document["grpo"]["rollout_s"] > 0 and document["grpo"]["update_s"] > 0 and document["eval"]["output_tokens"] > 0
    collected = document["gpu_tests"]["collected"]
    for test in ("bf16_loss", "liger", "fsdp2_over_nccl", "packed_per_token"):
        assert any(test in line for line in collected), test
    assert "## GPU check" in done.stdout and "Dry run on CPU: checks the script, measures nothing" in done.stdout


def test_report_renders_what_a_gpu_run_records():
    """The GPU-only branches of the report (MFU, flex_attention, liger, test outcomes, a failed
    try), from a document shaped like a GPU run's."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import SECTION, report

    layer = {"tokens": 16384, "sequences": 7, "heads": 12, "kv_heads": 2, "head_dim": 128, "dtype": "bfloat16",
             "sdpa_varlen": {"ms_forward_backward": 9.5, "max_abs_diff_vs_fp32": 0.004}, "flex_attention": {"error": "BackendCompilerFailed: x"},
             "sdpa_full_mask": {"ms_forward_backward": 40.1, "max_abs_diff_vs_fp32": 0.004}}  # fmt: skip
    document = {
        "date": "2026-12-01T10:00:00+00:00", "command": "python bench/gpu_check.py", "dry_run": False, "total_seconds": 400.0,
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "12.8", "transformers": "5.17.0", "attention_auto": "sdpa_varlen",
                        "installed": {"liger_kernel": "0.6.0", "flash_attn": None}},
        "train": {"status": "ok", "tokens_per_micro_batch": 16384, "tokens_per_s": 41000.0, "mfu": 0.47, "peak_memory_gb": 70.2},
        "attention": {"status": "ok", "model_packed_vs_alone_max_abs_diff": 0.03, "model_packed_vs_alone_mean_abs_diff": 0.002, "layer": layer},
        "liger": {"status": "ok", "positions": 16384, "vocab": 151936, "hidden": 1536,
                  "torch (LinearCrossEntropy)": {"loss": 195000.0, "ms_forward_backward": 50.0, "peak_extra_memory_gb": 1.2},
                  "liger-kernel": {"loss": 195001.0, "ms_forward_backward": 40.0, "peak_extra_memory_gb": 0.9, "grad_cosine_vs_torch": 0.99999}},
        "longest": {"status": "ok", "longest_tokens": 32768, "tries": [{"tokens": 65536, "fits": False, "error": "CUDA out of memory"},
                                                                       {"tokens": 32768, "fits": True, "peak_memory_gb": 120.0}]},
        "grpo": {"status": "ok", "prompts": 8, "group_size": 8, "max_tokens": 256, "rollout_s": 30.0, "update_s": 4.0},
        "eval": {"status": "failed: CUDA out of memory"},
        "gpu_tests": {"status": "failed: 1 tests", "tests": {"test_bf16_loss_is_the_fp32_loss_within_tolerance": "passed", "test_liger": "failed: assert"}},
    }  # fmt: skip
    text = report(document)
    assert text.startswith(SECTION) and "Dry run" not in text
    assert "| train: MFU | 47.0% | >= 45% |" in text
    assert "| flex_attention | failed: BackendCompilerFailed: x | |" in text and "| sdpa_varlen | 9.50 |" in text
    assert "| liger-kernel | 195001.00 | 40.0 | 0.90 | 0.99999 |" in text and "torch (checkpointed chunks)" not in text
    assert "65,536 does not fit (CUDA out of memory); 32,768 fits (120.0 GB)" in text
    assert "eval failed: CUDA out of memory" in text and "test_liger failed: assert" in text

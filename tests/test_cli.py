"""The CLI: help, doctor, one-line errors with non-zero exit codes and no traceback."""

from __future__ import annotations

import subprocess
import sys

COMMANDS = ["generate", "filter", "train", "grpo", "onpolicy", "eval", "compare", "demo", "doctor"]


def test_help_lists_every_command(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in COMMANDS:
        assert command in out
    for command in COMMANDS:
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "Usage" in out


def test_help_is_fast_and_imports_no_heavy_library():
    # `import distill.cli` must not pull torch, transformers or vllm (fast `distill --help`).
    code = "import sys, distill.cli; print(sorted(m for m in ('torch','transformers','vllm','datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_doctor_reports_versions_and_missing(run_cli):
    code, out, _ = run_cli("doctor")
    assert code == 0
    for name in ("python", "torch", "transformers", "vllm", "flash-attn", "peft", "datasets"):
        assert name in out
    assert "CUDA" in out


def test_console_script_error_is_one_line():
    result = subprocess.run([sys.executable, "-m", "distill.cli", "doctor", "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr

"""Every command docs/quickstart.md gives is a real command of this CLI: it parses, its recipe
exists, and its config loads (type-checked, presets applied) to the settings the text describes.
Nothing is run: each stage's `run` is replaced by a recorder, so this takes seconds."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"

# the stage modules whose `run` the CLI calls, and what the CLI reads from each result
STAGES = {
    "distill.teacher.generate": {"samples": 0, "trace_file": "traces.jsonl", "problems_complete": 0, "problems": 0},
    "distill.teacher.filter": {"accepted": 0, "rows": 0},
    "distill.students.sft": {"model_dir": "model"},
    "distill.students.grpo": {"model_dir": "model"},
    "distill.evaluate": {},
    "distill.compare": {"summary_table": ""},
}


def quickstart_commands() -> list[list[str]]:
    """The `distill ...` commands in the document's code blocks (continuation lines joined,
    `torchrun ... -m distill.cli` reduced to the distill arguments)."""
    blocks = re.findall(r"```\n(.*?)```", QUICKSTART.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "distill.cli" in words:
                words = ["distill", *words[words.index("distill.cli") + 1 :]]
            if words[:1] == ["distill"]:
                commands.append(words[1:])
    return commands


def test_the_quickstart_has_every_stage():
    stages = [command[0] for command in quickstart_commands()]
    for stage in ("doctor", "generate", "filter", "train", "eval", "compare"):
        assert stage in stages, stage


@pytest.mark.parametrize("args", quickstart_commands(), ids=lambda args: " ".join(args)[:60])
def test_quickstart_command_parses_and_loads(args, run_cli, monkeypatch):
    import importlib

    monkeypatch.chdir(ROOT)  # the recipes are given relative to the repository
    loaded = []
    for module, result in STAGES.items():
        def record(config, sources=None, result=result):
            loaded.append(config)
            return result

        monkeypatch.setattr(importlib.import_module(module), "run", record)
    code, out, err = run_cli(*args)
    assert code == 0, err
    if args[0] == "doctor":
        assert "torch" in out
        return
    (config,) = loaded
    if args[0] == "train":
        assert config.student == "qwen-1.5b" and config.lr == 5e-5 and config.epochs == 5 and config.global_batch == 128
        assert config.max_seq_len == 32768 and config.rope_theta == 300000.0 and config.lora == ("lora=true" in args)
    if args[0] == "generate":
        assert config.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" and config.n == 4 and config.data == "openr1-math"
        assert (config.temperature, config.top_p, config.max_tokens) == (0.6, 0.95, 32768)
    if args[0] == "eval":
        assert (config.temperature, config.top_p, config.max_tokens, config.benchmarks) == (0.6, 0.95, 32768, ("aime24", "math500"))
        if config.model == "Qwen/Qwen2.5-Math-1.5B":
            assert config.vllm.extra == {"hf_overrides": {"rope_theta": 300000.0, "max_position_embeddings": 32768}}

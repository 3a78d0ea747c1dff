"""The committed toy models (distill/toy/assets) are the ones their recipes make, and as good as
recorded when they were built.

A full rebuild (`python -m distill.toy build`) takes about 40 minutes of CPU, so these tests check
two cheaper things that together pin the models down:
- the committed models, evaluated greedily through `distill eval` on part of the held-out split,
  give exactly the verdicts recorded at build time (assets/quality.json);
- each recipe, run for a few steps on small corpora made the same way, reproduces the losses the
  build recorded: any change to the corpus writers, the tokenizer, the initial weights, the
  recipes or the training loop shows up here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from distill import toy
from distill.toy import build

PER_LEVEL = 5  # held-out problems per level checked here (the build measured toy.build's eval_per_level)


def quality() -> dict:
    if not toy.QUALITY_FILE.is_file():
        pytest.fail(f"{toy.QUALITY_FILE} is missing: build the toy models with `python -m distill.toy build --install`")
    return json.loads(toy.QUALITY_FILE.read_text(encoding="utf-8"))


def test_committed_models_fit_the_size_budget_and_load():
    from transformers import AutoConfig, AutoTokenizer

    size = sum(f.stat().st_size for d in (toy.TEACHER_DIR, toy.BASE_DIR) for f in d.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the committed toy models take {size / 2**20:.1f} MB; the budget is 20 MB"
    for path, shape in ((toy.TEACHER_DIR, toy.TEACHER_SHAPE), (toy.BASE_DIR, toy.STUDENT_SHAPE)):
        config = AutoConfig.from_pretrained(path)
        assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", shape.hidden, shape.layers)
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = "<think>\n9+8-3\n[9+8=17]-3\n[17-3=14]\n</think>\n\\boxed{14}"
        assert tokenizer(text).input_ids == toy.build_tokenizer()(text).input_ids


def test_committed_models_score_as_recorded(tmp_path):
    recorded = quality()["models"]
    for which, path in (("teacher", toy.TEACHER_DIR), ("base", toy.BASE_DIR)):
        measured = build.measure(path, tmp_path / which, per_level=PER_LEVEL)
        for benchmark, verdicts in measured["verdicts"].items():
            expected = {pid: recorded[which]["verdicts"][benchmark][pid] for pid in verdicts}
            differing = [pid for pid in verdicts if verdicts[pid] != expected[pid]]
            # Greedy decoding is deterministic; allow one flip per level for a near-tie that
            # another CPU's float rounding may break differently.
            assert len(differing) <= 1, f"{which} {benchmark}: verdicts differ from the recorded ones on {differing}"
    teacher, base = recorded["teacher"]["accuracy"], recorded["base"]["accuracy"]
    hard = [name for name in teacher if name.endswith(("L4", "L5", "L6"))]
    assert all(teacher[name] > base[name] for name in hard), "the teacher reasons its way through long sums the base cannot do"
    assert base["toy-L1"] >= 0.5, "the base answers easy problems directly"


@pytest.mark.parametrize("which", ["teacher", "base"])
def test_recipe_reproduces_the_recorded_start_of_training(tmp_path, which):
    recorded = quality()
    config = recorded["build"]["config"]
    cfg = build.BuildConfig(**{k: (Path(v) if k == "out" else v) for k, v in config.items()})
    losses = build.reproduction_run(which, cfg, tmp_path)
    expected = recorded["models"][which]["reproduction_losses"]
    assert len(losses) == len(expected) == build.EARLY_STEPS
    assert all(math.isclose(a, b, rel_tol=2e-3) for a, b in zip(losses, expected)), f"{which}: losses {losses} != recorded {expected}"
    assert losses[-1] < losses[0], "the loss falls"


@pytest.mark.skipif(
    os.environ.get("DISTILL_TOY_REBUILD") != "1",
    reason="a full rebuild of the toy models takes about 45 minutes of CPU: run with DISTILL_TOY_REBUILD=1",
)
def test_full_rebuild_reaches_the_committed_quality(tmp_path):
    """The whole build from the recipes, measured like the committed models: each level's greedy
    accuracy within 0.1 of the recorded one (another CPU's float rounding may move a few
    verdicts, not the quality)."""
    recorded = quality()
    config = {k: v for k, v in recorded["build"]["config"].items() if k not in ("out", "install")}
    rebuilt = build.build(build.BuildConfig(**config, out=tmp_path))
    for which in ("teacher", "base"):
        for level, accuracy in recorded["models"][which]["accuracy"].items():
            again = rebuilt["models"][which]["accuracy"][level]
            assert abs(again - accuracy) <= 0.1, f"{which} {level}: rebuilt {again:.3f}, committed {accuracy:.3f}"

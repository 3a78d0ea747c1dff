"""Build the toy world's two models with the project's own `distill train`, measure them, and
install them as the committed checkpoints the demo starts from.

    python -m distill.toy build                   # prepare + train both + measure, in runs/toy-build
    python -m distill.toy build --install         # ... and copy them into distill/toy/assets
    python -m distill.toy prepare                 # only the data and the initial weights

Steps:
1. prepare: the teacher corpus (chain-of-thought traces with slips) and the base corpus (direct
   answers and two-number sums) as chat-`messages` Parquet, and randomly initialised model
   directories with the toy tokenizer (distill.toy.init_model). Deterministic: same seed, same
   bytes.
2. train: `recipes/toy/teacher.yaml` and `recipes/toy/base.yaml` through `distill train`'s own
   `run` (the recipe as written, its paths pointed into OUT).
3. measure: `distill eval` of each model on the held-out split, one benchmark per level, greedy
   (temperature 0, k=1: deterministic, so a later check can expect the very same verdicts).
4. reproduction runs: each recipe for EARLY_STEPS steps on REPRO_EXAMPLES-row corpora made the
   same way; their losses are recorded for tests/test_toy_models.py, which reruns them (a full
   rebuild takes tens of CPU-minutes; these take seconds and catch any change to the corpora,
   tokenizer, initial weights, recipes or training loop).
5. install: copy both exported models into distill/toy/assets/{teacher,base} and write
   assets/quality.json: per-level accuracy, the per-problem verdicts (tests/test_toy_models.py
   checks the committed models still give them), the reproduction losses, the command, the
   machine and the wall times.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from distill import toy

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "toy"
EARLY_STEPS = 5  # training steps of the reproduction run (tests/test_toy_models.py)
REPRO_EXAMPLES = 2_000  # rows of each corpus in the reproduction run


@dataclass(frozen=True)
class BuildConfig:
    out: Path = Path("runs/toy-build")
    teacher_examples: int = 72_000  # CoT traces in the teacher corpus (12k per level)
    slip_rate: float = 0.03  # per step: a slipped step propagates to a wrong answer
    base_examples: int = 100_000  # rows of the base corpus
    step_fraction: float = 0.2  # of them two-number sums taken from running totals
    cot_fraction: float = 0.5  # of them worked solutions asked "step by step": the base can reason when asked
    bare_cot_fraction: float = 0.03  # of them worked solutions to the bare problem: it rarely does unasked
    seed: int = 0
    eval_per_level: int = 40  # held-out problems per level for the quality figures
    install: bool = False
    # The models to train. Any other is the committed one (distill/toy/assets), measured again on
    # today's held-out split, its training record carried over from the committed quality.json:
    # adding a level the base's corpus leaves out (toy.BASE_LEVELS) changes only the teacher.
    models: tuple[str, ...] = ("teacher", "base")

    def __post_init__(self) -> None:
        unknown = set(self.models) - {"teacher", "base"}
        if unknown:
            raise ValueError(f"models: {sorted(unknown)} are not toy models; use teacher and/or base")


def prepare(cfg: BuildConfig) -> dict[str, Path]:
    """Data and initial weights under cfg.out; returns their paths by name."""
    from distill.records import write_parquet

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "teacher_data": out / "teacher.parquet",
        "base_data": out / "base.parquet",
        "teacher_init": out / "teacher-init",
        "base_init": out / "base-init",
    }
    write_parquet(toy.teacher_corpus(cfg.teacher_examples, cfg.seed, cfg.slip_rate), paths["teacher_data"])
    base = toy.base_corpus(cfg.base_examples, cfg.seed, cfg.step_fraction, cfg.cot_fraction, cfg.bare_cot_fraction)
    write_parquet(base, paths["base_data"])
    toy.init_model(toy.TEACHER_SHAPE, paths["teacher_init"], seed=cfg.seed)
    toy.init_model(toy.STUDENT_SHAPE, paths["base_init"], seed=cfg.seed)
    return paths


def train(which: str, cfg: BuildConfig, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run recipes/toy/{which}.yaml with `distill train`, its paths pointed into cfg.out."""
    from distill.students.sft import load_train_config, run

    out = Path(cfg.out)
    paths = (f"student={out / (which + '-init')}", f"data={out / (which + '.parquet')}", f"out={out / which}")
    loaded = load_train_config(recipe=RECIPES / f"{which}.yaml", overrides=(*paths, *overrides))
    return run(loaded.config, loaded.sources)


def measure(model: Path, out: Path, per_level: int) -> dict[str, Any]:
    """Greedy accuracy per level on the held-out split, through `distill eval`."""
    from distill.evaluate import EvalConfig, run

    data = out / "heldout"
    benchmarks = write_level_files(toy.heldout_split(per_level), data)
    cfg = EvalConfig(
        model=str(model), benchmarks=benchmarks, out=out, engine="hf", k=1, temperature=0.0, top_p=1.0,
        max_tokens=toy.MAX_NEW_TOKENS, instruction=toy.INSTRUCTION,
    )  # fmt: skip
    metrics = run(cfg)
    accuracy = {name: figures["pass@1"] for name, figures in metrics["benchmarks"].items()}
    verdicts = {}
    from distill.evaluate import read_samples

    for name in accuracy:
        verdicts[name] = {s.problem_id: bool(s.correct) for s in read_samples(out, name)}
    return {"accuracy": accuracy, "verdicts": verdicts}


def write_level_files(problems: list[toy.ToyProblem], folder: Path) -> tuple[str, ...]:
    """One JSONL per level; returns `distill eval` benchmark specs "toy-L1=PATH", ..."""
    specs = []
    for level in sorted({p.level for p in problems}):
        path = toy.write_problems([p for p in problems if p.level == level], Path(folder) / f"L{level}.jsonl")
        specs.append(f"toy-L{level}={path}")
    return tuple(specs)


def early_losses(run_dir: Path, steps: int = EARLY_STEPS) -> list[float]:
    from distill.rundir import step_rows

    return [row["loss"] for row in step_rows(run_dir)][:steps]


def reproduction_run(which: str, cfg: BuildConfig, out: Path) -> list[float]:
    """The first EARLY_STEPS losses of `which`'s recipe on REPRO_EXAMPLES-row corpora made with
    cfg's settings: cheap enough for a test, and any change to the corpus writers, tokenizer,
    initial weights, recipe or training loop changes them."""
    small = replace(cfg, out=Path(out), teacher_examples=REPRO_EXAMPLES, base_examples=REPRO_EXAMPLES)
    prepare(small)
    train(which, small, overrides=(f"max_steps={EARLY_STEPS}", f"save_every={EARLY_STEPS}"))
    return early_losses(Path(out) / which)


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Prepare, train, measure and record; with cfg.install, install. A rerun resumes: finished
    training runs are kept (their resume is a no-op), so an interrupted build loses nothing."""
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    started = time.time()
    prepare(cfg)
    timings["prepare_s"] = round(time.time() - started, 1)
    quality: dict[str, Any] = {"build": _describe(cfg), "models": {}}
    previous = json.loads(toy.QUALITY_FILE.read_text(encoding="utf-8")) if toy.QUALITY_FILE.is_file() else {}
    committed = previous.get("models", {})
    for which in ("teacher", "base"):
        if which in cfg.models:
            train(which, cfg)
            model, record = out / which / "model", {**training_record(out / which), "reproduction_losses": reproduction_run(which, cfg, out / "reproduction")}
        else:
            if which not in committed:
                raise ValueError(f"models={list(cfg.models)} keeps the committed {which}, but {toy.QUALITY_FILE} has no record of it; build it too")
            model = toy.TEACHER_DIR if which == "teacher" else toy.BASE_DIR
            kept = ("steps", "first_loss", "final_loss", "train_wall_s", "train_cpu_s", "reproduction_losses")
            record = {**{k: committed[which][k] for k in kept}, "kept_from": committed[which].get("kept_from") or f"the build of {previous['build'].get('date')}"}
        started = time.time()
        measured = measure(model, out / f"eval-{which}", cfg.eval_per_level)
        timings[f"eval_{which}_s"] = round(time.time() - started, 1)
        quality["models"][which] = {"recipe": f"recipes/toy/{which}.yaml", **record, **measured}
    quality["build"]["timings"] = timings
    (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n", encoding="utf-8")
    if cfg.install:
        install(out)
    return quality


def training_record(run_dir: Path) -> dict[str, Any]:
    """Steps, first and final loss, and the time the training steps took, from the run's
    metrics.jsonl (so a finished run that was resumed still reports its real training)."""
    from distill.rundir import step_rows

    steps = step_rows(run_dir)
    return {
        "steps": len(steps),
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "train_wall_s": round(sum(row.get("step_time_s", 0.0) for row in steps), 1),
        "train_cpu_s": round(sum(row.get("cpu_time_s", 0.0) for row in steps), 1),
    }


def install(out: Path) -> None:
    """Copy the built models and their quality record into distill/toy/assets (what the demo loads)."""
    out = Path(out)
    for which, target in (("teacher", toy.TEACHER_DIR), ("base", toy.BASE_DIR)):
        if not (out / which / "model").is_dir():  # kept, not rebuilt (BuildConfig.models)
            continue
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(out / which / "model", target)
    shutil.copyfile(out / "quality.json", toy.QUALITY_FILE)


def _describe(cfg: BuildConfig) -> dict[str, Any]:
    import os

    import torch

    return {
        "command": f"python -m distill.toy build --out {cfg.out}" + ("" if cfg.models == BuildConfig.models else f" models=[{','.join(cfg.models)}]"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }

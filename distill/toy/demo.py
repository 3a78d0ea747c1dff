"""`distill demo`: the whole pipeline on the embedded toy world, on CPU, with the real stages.

    distill demo                      # about 10 minutes on 2 CPU cores
    distill demo --quick              # the same six steps at small size, about 3 minutes
    distill demo --out runs/demo key=value ...   # any DemoConfig field, e.g. samples=8

Each step is the stage's own `run` (what its `distill <stage>` command calls), writing its own
run directory under --out, so every file the pipeline makes can be opened and every step rerun
by hand with the command printed before it:

    data/       train.jsonl (problems the teacher solves and GRPO trains on), test/L1..L5.jsonl
                (the held-out split, one benchmark per difficulty level)
    generate/   1. the toy teacher samples `samples` traces per training problem (hf engine)
    filter/     2. the shared verifier and the other filters keep the good traces; the training
                problems are decontaminated against the test split
    train/      3. the base student distilled on the accepted traces
    grpo/       4. the same base student trained with RL only (GRPO) on the same problems
    eval-base/, eval-distilled/, eval-rl/
                5. the three students on the test split, k samples each, one locked protocol
    report/     6. `distill compare`: report.md, report.csv, accuracy/length/compute plots

The models start from distill/toy/assets (teacher and base student, made by
`python -m distill.toy build`, see distill/toy/build.py). Choices:
- The prompt is the bare problem (instruction ""): the toy task never changes, and the R1
  instruction would double every sequence the CPU trains on. Every stage gets the same
  instruction, so generation, training, RL and evaluation render prompts identically.
- Compute: the RL-only student gets about the training compute the distilled one gets
  (`grpo_steps` is chosen so rollouts plus updates process roughly as many tokens as SFT does);
  the teacher's sampling cost is the distilled student's alone and is reported by compare as
  teacher tokens. The table shows each model's CPU time and tokens, so the budgets can be read.
- Eval follows the R1 protocol (temperature 0.6, top-p 0.95, k samples with their own seeds),
  with max_tokens the toy traces need.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from distill import toy


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    quick: bool = False  # the QUICK sizes below (set by --quick)
    seed: int = 0
    # data
    problems: int = 400  # training problems (teacher sampling, GRPO prompts)
    test_per_level: int = 40  # held-out problems per level (5 levels)
    # 1. generate
    samples: int = 4  # teacher traces per problem
    teacher_temperature: float = 0.6  # R1's sampling temperature
    batch_size: int = 64  # rows decoded together by the hf engine
    # 3. train (distillation)
    sft_epochs: int = 4
    sft_lr: float = 1.0e-3
    sft_batch: int = 32
    # 4. grpo (RL only); steps: None = matched to the SFT run's tokens (see `grpo_steps`)
    grpo_steps: int | None = None
    grpo_prompts: int = 16  # prompts per step
    grpo_group: int = 8  # completions per prompt
    grpo_lr: float = 1.0e-4
    grpo_variant: str = "grpo"
    # 5. eval
    k: int = 4  # samples per test problem


QUICK = {"problems": 96, "test_per_level": 16, "samples": 4, "sft_epochs": 4, "grpo_prompts": 8, "k": 2}


def run(cfg: DemoConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    from distill.compare import CompareConfig
    from distill.compare import run as compare
    from distill.evaluate import EvalConfig
    from distill.evaluate import run as evaluate
    from distill.rundir import write_json
    from distill.students.grpo import load_grpo_config
    from distill.students.grpo import run as grpo
    from distill.students.sft import load_train_config
    from distill.students.sft import run as train
    from distill.teacher.filter import FilterConfig
    from distill.teacher.filter import run as filter_
    from distill.teacher.generate import GenerateConfig, HFOptions
    from distill.teacher.generate import run as generate
    from distill.toy.build import write_level_files

    if not (toy.TEACHER_DIR / "config.json").is_file() or not (toy.BASE_DIR / "config.json").is_file():
        from distill.errors import InputError

        raise InputError(f"{toy.ASSETS}: the toy models are missing; build them with `python -m distill.toy build --install`")
    out = Path(cfg.out)
    started = time.time()
    timings: dict[str, float] = {}

    def step(name: str, command: str) -> None:
        timings[name] = time.time()
        print(f"\n== {name}: {command}", file=sys.stderr, flush=True)

    def done(name: str) -> None:
        timings[name] = round(time.time() - timings[name], 1)

    # ---- 0. data: training problems and the held-out test split -----------------------------
    train_problems = toy.write_problems(toy.train_split(cfg.problems, seed=cfg.seed, name="demo"), out / "data" / "train.jsonl")
    test_benchmarks = write_level_files(toy.heldout_split(cfg.test_per_level), out / "data" / "test")
    test_files = [spec.split("=", 1)[1] for spec in test_benchmarks]
    hf = HFOptions(batch_size=cfg.batch_size, device="cpu")
    instruction = toy.INSTRUCTION

    # ---- 1. generate -------------------------------------------------------------------------
    step("generate", f"distill generate --model {toy.TEACHER_DIR} --data {train_problems} --out {out / 'generate'} --engine hf --n {cfg.samples}")
    generated = generate(GenerateConfig(
        model=str(toy.TEACHER_DIR), data=str(train_problems), out=out / "generate", engine="hf", n=cfg.samples,
        max_tokens=toy.MAX_NEW_TOKENS, temperature=cfg.teacher_temperature, top_p=0.95, seed=cfg.seed,
        instruction=instruction, hf=hf,
    ))  # fmt: skip
    done("generate")

    # ---- 2. filter ---------------------------------------------------------------------------
    step("filter", f"distill filter --in {out / 'generate'} --out {out / 'filter'}")
    filtered = filter_(FilterConfig(
        traces=out / "generate", out=out / "filter", student=str(toy.BASE_DIR), max_seq_len=256,
        decontaminate=tuple(test_files), decontamination_ngram=2, dedup=False, verifier_workers=1,
    ))  # fmt: skip
    done("filter")

    # ---- 3. train: distil the base student on the accepted traces -----------------------------
    step("train", f"distill train --student {toy.BASE_DIR} --data {out / 'filter' / 'accepted.parquet'} --out {out / 'train'}")
    sft_overrides = (
        f"student={toy.BASE_DIR}", f"data={out / 'filter' / 'accepted.parquet'}", f"out={out / 'train'}",
        "chat_template=model", "max_seq_len=160", f"epochs={cfg.sft_epochs}", f"global_batch={cfg.sft_batch}",
        f"lr={cfg.sft_lr}", "warmup_ratio=0.05", "min_lr_ratio=0.1", "grad_clip=1.0", f"seed={cfg.seed}",
        "micro_batch_tokens=2048", "save_every=1000",
    )  # fmt: skip
    loaded = load_train_config(overrides=sft_overrides)
    trained = train(loaded.config, loaded.sources)
    done("train")

    # ---- 4. grpo: the same base student, RL only -----------------------------------------------
    steps = cfg.grpo_steps or grpo_steps_for(trained, cfg)
    step("grpo", f"distill grpo --student {toy.BASE_DIR} --data {train_problems} --out {out / 'grpo'} steps={steps}")
    rl_overrides = (
        f"student={toy.BASE_DIR}", f"data={train_problems}", f"out={out / 'grpo'}", f"variant={cfg.grpo_variant}",
        f"steps={steps}", f"prompts_per_step={cfg.grpo_prompts}", f"group_size={cfg.grpo_group}",
        f"max_tokens={toy.MAX_NEW_TOKENS}", f"lr={cfg.grpo_lr}", "instruction=", "chat_template=model",
        "micro_batch_size=64", f"seed={cfg.seed}", "save_every=1000", "verifier_workers=1",
        f"engine_options={{batch_size: {cfg.batch_size}, device: cpu}}",
    )  # fmt: skip
    loaded = load_grpo_config(overrides=rl_overrides)
    reinforced = grpo(loaded.config, loaded.sources)
    done("grpo")

    # ---- 5. eval: three students, one protocol ------------------------------------------------
    models = {"eval-base": str(toy.BASE_DIR), "eval-distilled": str(out / "train" / "model"), "eval-rl": str(out / "grpo" / "model")}
    names = {"eval-base": "base", "eval-distilled": "distilled", "eval-rl": "rl-only"}
    evaluations = {}
    for run_name, model in models.items():
        step(run_name, f"distill eval --model {model} --benchmarks {','.join(test_benchmarks)} --out {out / run_name} --engine hf --k {cfg.k}")
        evaluations[run_name] = evaluate(EvalConfig(
            model=model, benchmarks=test_benchmarks, out=out / run_name, engine="hf", k=cfg.k,
            max_tokens=toy.MAX_NEW_TOKENS, instruction=instruction, seed=cfg.seed, hf=hf, verifier_workers=1,
            name=names[run_name],
        ))  # fmt: skip
        done(run_name)

    # ---- 6. compare ----------------------------------------------------------------------------
    step("compare", f"distill compare {' '.join(str(out / r) for r in models)} --baseline {out / 'eval-base'} --out {out / 'report'}")
    report = compare(CompareConfig(runs=tuple(out / r for r in models), baseline=out / "eval-base", out=out / "report"))
    done("compare")

    summary = {
        "quick": cfg.quick,
        "wall_time_s": round(time.time() - started, 1),
        "step_times_s": timings,
        "teacher_samples": generated.get("samples"),
        "accepted": filtered.get("accepted"),
        "rejected": filtered.get("rejected"),
        "reject_reasons": filtered.get("reject_reasons"),
        "sft_steps": trained.get("steps"),
        "grpo_steps": steps,
        "pass@1": {names[r]: overall_pass_at_1(m) for r, m in evaluations.items()},
        "pass@1_by_level": {names[r]: {b: f["pass@1"] for b, f in m["benchmarks"].items()} for r, m in evaluations.items()},
        "report": str(out / "report" / "report.md"),
        "grpo": {k: reinforced.get(k) for k in ("final_reward_mean", "final_accuracy") if k in reinforced},
    }
    write_json(out / "summary.json", summary)
    print((out / "report" / "report.md").read_text(encoding="utf-8"))
    print(summary_lines(summary))
    return summary


def overall_pass_at_1(metrics: Mapping[str, Any]) -> float:
    """pass@1 over every test problem (the levels have equal sizes, so the mean of the levels)."""
    figures = [f["pass@1"] for f in metrics["benchmarks"].values()]
    return sum(figures) / len(figures)


def grpo_steps_for(trained: Mapping[str, Any], cfg: DemoConfig) -> int:
    """RL steps whose tokens roughly match the SFT run's: SFT processed about
    epochs * trained-token count (plus prompts) forward and backward; one RL step samples
    prompts * group completions (forward only, about a third of a training token's cost) and
    trains on them once (forward and backward)."""
    sft_tokens = (trained.get("trained_tokens_per_epoch") or 0) * cfg.sft_epochs * 1.5  # + prompt tokens
    per_completion = 40 + 30  # prompt + completion tokens of a typical toy sample
    per_step = cfg.grpo_prompts * cfg.grpo_group * per_completion * (1 + 1 / 3)
    return max(4, math.ceil(sft_tokens / per_step))


def summary_lines(summary: Mapping[str, Any]) -> str:
    lines = [f"\ndistill demo{' --quick' if summary['quick'] else ''}: {summary['wall_time_s']:.0f}s in all "
             f"({', '.join(f'{k} {v:.0f}s' for k, v in summary['step_times_s'].items())})"]
    lines.append(f"teacher traces: {summary['teacher_samples']}, accepted {summary['accepted']}, rejected {summary['rejected']} {summary['reject_reasons']}")
    for name, value in summary["pass@1"].items():
        levels = " ".join(f"{b.split('-')[-1]} {v:.2f}" for b, v in summary["pass@1_by_level"][name].items())
        lines.append(f"  {name:<10} pass@1 {value:.3f}   ({levels})")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def load(quick: bool, out: Path | None, overrides=()) -> Any:
    """The demo's config: defaults, the QUICK sizes with --quick, then key=value overrides."""
    from distill.config import load_config

    flags = {"quick": quick or None, "out": out}
    return load_config(DemoConfig, flags=flags, overrides=overrides, preset=QUICK if quick else None, preset_name="quick")

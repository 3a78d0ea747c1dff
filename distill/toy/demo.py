"""`distill demo`: the whole pipeline on the embedded toy world, on CPU, with the real stages.

    distill demo                      # about 7 minutes on 2 CPU cores
    distill demo --quick              # the same seven steps at small size, about 100 seconds
    distill demo --out runs/demo key=value ...   # any DemoConfig field, e.g. samples=8
    distill demo --engine vllm --out runs/demo-vllm   # vLLM for teacher sampling, RL rollouts and evals

Each step is the stage's own `run` (what its `distill <stage>` command calls), writing its own
run directory under --out, so every file the pipeline makes can be opened and every step rerun
by hand with the command printed before it (`distill <stage> --recipe RUN/config.yaml`):

    data/       train.jsonl (problems the teacher solves and the students train on), test/L1..L6.jsonl
                (the held-out split, one benchmark per difficulty level)
    generate/   1. the toy teacher samples `samples` traces per training problem (hf engine, or --engine vllm)
    filter/     2. the shared verifier and the other filters keep the good traces; the training
                problems are decontaminated against the test split
    train/      3. the base student distilled on the accepted traces
    onpolicy/   4. the same base student distilled on-policy: it samples, the teacher scores
                every sampled token (reverse KL per token, `distill onpolicy`)
    grpo/       5. the same base student trained with RL only (GRPO) on the same problems
    eval-base/, eval-distilled/, eval-onpolicy/, eval-rl/
                6. the four students on the test split, k samples each, one locked protocol
    report/     7. `distill compare`: report.md, report.csv, accuracy/length/compute plots

The models start from distill/toy/assets (teacher and base student, made by
`python -m distill.toy build`, see distill/toy/build.py). Choices:
- The prompt is the bare problem (instruction ""): the toy task never changes, and the R1
  instruction would double every sequence the CPU trains on. Every stage gets the same
  instruction, so generation, training, RL and evaluation render prompts identically.
- Compute: the on-policy and RL-only students train on as many sequences as the distilled one
  (their own samples instead of the teacher's; `grpo_budget` / `onpolicy_budget` scale that,
  `grpo_steps` / `onpolicy_steps` set it outright, see `steps_for`). compare's table shows
  each model's training compute (its ledger: teacher and student tokens, estimated FLOPs), so
  the budgets can be read.
- Eval follows the R1 protocol (temperature 0.6, top-p 0.95, k samples with their own seeds),
  with max_tokens the toy traces need.
- `engine=vllm` samples with vLLM (the CPU build `make setup` installs) wherever the hf engine
  would: the teacher, the GRPO rollouts (colocated, weights synced every step) and the evals.
  In float32, as the hf engine on CPU, and without torch.compile (`enforce_eager`): for models
  this small, compiling costs more start-up time than it saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from distill import toy


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")  # with --quick and no --out: runs/demo-quick
    quick: bool = False  # the QUICK sizes below (set by --quick)
    engine: Literal["hf", "vllm"] = "hf"  # teacher sampling, GRPO rollouts and evals (set by --engine)
    seed: int = 0
    # data
    problems: int = 400  # training problems (teacher sampling, GRPO prompts)
    test_per_level: int = 40  # held-out problems per level (5 levels)
    # 1. generate
    samples: int = 4  # teacher traces per problem
    # The toy teacher learned to slip at its corpus's rate (3% per step, spread over 4 wrong
    # results); sampled as trained (temperature 1, no top-p cut) it slips about that often, which
    # gives the filter something to catch. At R1's 0.6 / 0.95 it slipped on 1 trace in 400.
    teacher_temperature: float = 1.0
    teacher_top_p: float = 1.0
    batch_size: int = 64  # rows decoded together by the hf engine
    # 3. train (distillation)
    sft_epochs: int = 4
    sft_lr: float = 1.0e-3
    sft_batch: int = 32
    # 4. onpolicy (on-policy distillation); steps: None = as many training sequences as SFT, times onpolicy_budget
    onpolicy_steps: int | None = None
    onpolicy_budget: float = 1.0
    onpolicy_prompts: int = 16  # prompts per step
    onpolicy_group: int = 8  # completions per prompt
    onpolicy_lr: float = 1.0e-4
    # 5. grpo (RL only); steps: None = as many training sequences as SFT, times grpo_budget (see `steps_for`)
    grpo_steps: int | None = None
    grpo_budget: float = 1.0
    grpo_prompts: int = 16  # prompts per step
    grpo_group: int = 8  # completions per prompt
    grpo_lr: float = 1.0e-4
    grpo_variant: str = "grpo"
    # 6. eval
    k: int = 4  # samples per test problem


# The quick demo has a quarter of the traces: at the full demo's batch of 32 its 4 epochs are 44
# optimizer steps, too few for the distilled student to learn the long levels (it fell below its
# base); batches of 16 at twice the rate converge in the same number of sequences.
QUICK = {"problems": 96, "test_per_level": 16, "samples": 4, "sft_epochs": 4, "sft_batch": 16, "sft_lr": 2.0e-3,
         "grpo_prompts": 8, "onpolicy_prompts": 8, "k": 2}  # fmt: skip


def run(cfg: DemoConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    from distill.compare import CompareConfig
    from distill.compare import run as compare
    from distill.evaluate import EvalConfig
    from distill.evaluate import run as evaluate
    from distill.rundir import RunDir
    from distill.students.grpo import load_grpo_config
    from distill.students.grpo import run as grpo
    from distill.students.onpolicy import load_onpolicy_config
    from distill.students.onpolicy import run as onpolicy
    from distill.students.sft import load_train_config
    from distill.students.sft import run as train
    from distill.teacher.filter import FilterConfig
    from distill.teacher.filter import run as filter_
    from distill.teacher.generate import GenerateConfig, HFOptions, VLLMOptions
    from distill.teacher.generate import run as generate
    from distill.toy.build import write_level_files

    if not (toy.TEACHER_DIR / "config.json").is_file() or not (toy.BASE_DIR / "config.json").is_file():
        from distill.errors import InputError

        raise InputError(f"{toy.ASSETS}: the toy models are missing; build them with `python -m distill.toy build --install`")
    out = Path(cfg.out)
    # The demo's own run directory: config.yaml, demo.log and the summary as metrics.json. Its
    # settings are locked: rerunning resumes every stage; other settings need another --out.
    run_dir = RunDir(out, "demo", cfg, sources, locked=[f.name for f in dataclasses.fields(cfg) if f.name != "out"])
    run_dir.announce(f"distill demo{' --quick' if cfg.quick else ''}: the toy world on CPU, generate -> filter -> train, onpolicy, grpo -> eval x4 -> compare, "
                     f"into {out}", shown=("out", "quick"))
    started = time.time()
    timings: dict[str, float] = {}

    def step(name: str, stage: str, run: str) -> None:
        # Each stage writes its resolved settings to RUN/config.yaml, which is a recipe: the
        # printed command reruns (or resumes) the step by hand.
        timings[name] = time.time()
        run_dir.say(f"\n== {name}: distill {stage} --recipe {out / run / 'config.yaml'}")

    def done(name: str) -> None:
        timings[name] = round(time.time() - timings[name], 1)

    # ---- 0. data: training problems and the held-out test split -----------------------------
    train_problems = toy.write_problems(toy.train_split(cfg.problems, seed=cfg.seed, name="demo"), out / "data" / "train.jsonl")
    test_benchmarks = write_level_files(toy.heldout_split(cfg.test_per_level), out / "data" / "test")
    test_files = [spec.split("=", 1)[1] for spec in test_benchmarks]
    # generate's and eval's engine settings: only the chosen engine's, so the settings line each
    # stage prints names no options of an engine it does not use
    engine = ({"engine": "hf", "hf": HFOptions(batch_size=cfg.batch_size, device="cpu")} if cfg.engine == "hf"
              else {"engine": "vllm", "vllm": VLLMOptions(dtype="float32", extra={"enforce_eager": True})})  # fmt: skip
    rollouts = (f"engine_options={{batch_size: {cfg.batch_size}, device: cpu}}" if cfg.engine == "hf"
                else "engine_options={extra: {enforce_eager: true}}")  # fmt: skip
    instruction = toy.INSTRUCTION

    # ---- 1. generate -------------------------------------------------------------------------
    step("generate", "generate", "generate")
    generated = generate(GenerateConfig(
        model=str(toy.TEACHER_DIR), data=str(train_problems), out=out / "generate", n=cfg.samples,
        max_tokens=toy.MAX_NEW_TOKENS, temperature=cfg.teacher_temperature, top_p=cfg.teacher_top_p, seed=cfg.seed,
        instruction=instruction, **engine,
    ))  # fmt: skip
    done("generate")

    # ---- 2. filter ---------------------------------------------------------------------------
    step("filter", "filter", "filter")
    filtered = filter_(FilterConfig(
        traces=out / "generate", out=out / "filter", student=str(toy.BASE_DIR), max_seq_len=256,
        decontaminate=tuple(test_files), decontamination_ngram=16, dedup=False, verifier_workers=1,
    ))  # fmt: skip
    done("filter")

    # ---- 3. train: distil the base student on the accepted traces -----------------------------
    step("train", "train", "train")
    sft_overrides = (
        f"student={toy.BASE_DIR}", f"data={out / 'filter' / 'accepted.parquet'}", f"out={out / 'train'}",
        "chat_template=model", "max_seq_len=256", f"epochs={cfg.sft_epochs}", f"global_batch={cfg.sft_batch}",
        f"lr={cfg.sft_lr}", "warmup_ratio=0.05", "min_lr_ratio=0.1", "grad_clip=1.0", f"seed={cfg.seed}",
        # Not packed: the recorded demo figures were made padded, and for 16 short length-sorted
        # toy sequences padding costs no more than packing (docs/benchmarks.md, packed vs padded).
        "packing=false", "micro_batch_size=16", "save_every=1000",
    )  # fmt: skip
    loaded = load_train_config(overrides=sft_overrides)
    trained = train(loaded.config, loaded.sources)
    done("train")

    # What the two stages that learn from the student's own samples share (the same base, problems,
    # lengths, prompt, rollout engine and seed), so their arms differ only in the signal: the
    # teacher's per-token log-probs, or the verifier's reward.
    own_samples = (
        f"student={toy.BASE_DIR}", f"data={train_problems}", f"max_tokens={toy.MAX_NEW_TOKENS}", "instruction=", "chat_template=model",
        "micro_batch_size=64", f"seed={cfg.seed}", "save_every=1000", "verifier_workers=1", f"engine={cfg.engine}", rollouts,
    )  # fmt: skip

    # ---- 4. onpolicy: the same base student, distilled on its own samples ---------------------
    onpolicy_steps = cfg.onpolicy_steps or steps_for(trained, cfg, cfg.onpolicy_prompts, cfg.onpolicy_group, cfg.onpolicy_budget)
    step("onpolicy", "onpolicy", "onpolicy")
    op_overrides = (
        *own_samples, f"teacher={toy.TEACHER_DIR}", f"out={out / 'onpolicy'}", f"steps={onpolicy_steps}",
        f"prompts_per_step={cfg.onpolicy_prompts}", f"group_size={cfg.onpolicy_group}", f"lr={cfg.onpolicy_lr}",
    )  # fmt: skip
    loaded = load_onpolicy_config(overrides=op_overrides)
    distilled_on_policy = onpolicy(loaded.config, loaded.sources)
    done("onpolicy")

    # ---- 5. grpo: the same base student, RL only -----------------------------------------------
    steps = cfg.grpo_steps or steps_for(trained, cfg, cfg.grpo_prompts, cfg.grpo_group, cfg.grpo_budget)
    step("grpo", "grpo", "grpo")
    rl_overrides = (
        *own_samples, f"out={out / 'grpo'}", f"variant={cfg.grpo_variant}", f"steps={steps}",
        f"prompts_per_step={cfg.grpo_prompts}", f"group_size={cfg.grpo_group}", f"lr={cfg.grpo_lr}",
    )  # fmt: skip
    loaded = load_grpo_config(overrides=rl_overrides)
    reinforced = grpo(loaded.config, loaded.sources)
    done("grpo")

    # ---- 6. eval: four students, one protocol -------------------------------------------------
    models = {"eval-base": str(toy.BASE_DIR), "eval-distilled": str(out / "train" / "model"),
              "eval-onpolicy": str(out / "onpolicy" / "model"), "eval-rl": str(out / "grpo" / "model")}  # fmt: skip
    names = {"eval-base": "base", "eval-distilled": "distilled", "eval-onpolicy": "on-policy", "eval-rl": "rl-only"}
    evaluations = {}
    for run_name, model in models.items():
        step(run_name, "eval", run_name)
        evaluations[run_name] = evaluate(EvalConfig(
            model=model, benchmarks=test_benchmarks, out=out / run_name, k=cfg.k,
            max_tokens=toy.MAX_NEW_TOKENS, instruction=instruction, seed=cfg.seed, verifier_workers=1, **engine,
            name=names[run_name],
        ))  # fmt: skip
        done(run_name)

    # ---- 7. compare ----------------------------------------------------------------------------
    step("compare", "compare", "report")
    compared = compare(CompareConfig(runs=tuple(out / r for r in models), baseline=out / "eval-base", out=out / "report"))
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
        "onpolicy_steps": onpolicy_steps,
        "grpo_steps": steps,
        "pass@1": {names[r]: overall_pass_at_1(m) for r, m in evaluations.items()},
        "pass@1_by_level": {names[r]: {b: f["pass@1"] for b, f in m["benchmarks"].items()} for r, m in evaluations.items()},
        "report": str(out / "report" / "report.md"),
        "onpolicy": {k: distilled_on_policy.get(k) for k in ("reverse_kl_first", "reverse_kl_last10", "accuracy_last10", "completion_length_last10")},
        "grpo": {k: reinforced.get(k) for k in ("reward_mean_first", "reward_mean_last10", "accuracy_last10", "completion_length_last10")},
    }
    summary = json.loads(run_dir.write_metrics(summary).read_text(encoding="utf-8"))
    print(compared["summary_table"])  # the report's summary; report.md has the details
    print(summary_lines(summary))
    return summary


def overall_pass_at_1(metrics: Mapping[str, Any]) -> float:
    """pass@1 over every test problem (the levels have equal sizes, so the mean of the levels)."""
    figures = [f["pass@1"] for f in metrics["benchmarks"].values()]
    return sum(figures) / len(figures)


def steps_for(trained: Mapping[str, Any], cfg: DemoConfig, prompts: int, group: int, budget: float) -> int:
    """Steps of an on-policy stage (onpolicy, grpo) that train on as many sequences as the SFT run
    did, times `budget`.

    SFT makes `sequences * epochs` forward-backward passes over teacher traces; an on-policy step
    samples `prompts * group` completions from the student and makes one forward-backward pass
    over each (mu=1). So at budget 1 every student sees the same number of training sequences,
    and each side pays for sampling them once (the teacher for SFT; the student itself for RL
    and on-policy distillation, whose teacher also scores every sampled token). Token counts
    differ with what each model writes: compare's table shows each run's training compute."""
    sequences = (trained.get("sequences") or 0) * cfg.sft_epochs
    return max(1, math.ceil(budget * sequences / (prompts * group)))


def summary_lines(summary: Mapping[str, Any]) -> str:
    lines = [f"\ndistill demo{' --quick' if summary['quick'] else ''}: {summary['wall_time_s']:.0f}s in all "
             f"({', '.join(f'{k} {v:.0f}s' for k, v in summary['step_times_s'].items())})"]
    lines.append(f"teacher traces: {summary['teacher_samples']}, accepted {summary['accepted']}, rejected {summary['rejected']} {summary['reject_reasons']}")
    for name, value in summary["pass@1"].items():
        levels = " ".join(f"{b.split('-')[-1]} {v:.2f}" for b, v in summary["pass@1_by_level"][name].items())
        lines.append(f"  {name:<10} pass@1 {value:.3f}   ({levels})")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def load_demo_config(quick: bool = False, out: Path | None = None, recipe: Path | None = None, overrides=(), engine: str | None = None) -> Any:
    """The demo's config: defaults < the QUICK sizes (with --quick) < recipe < flags < key=value."""
    from distill.config import load_config

    flags = {"quick": quick or None, "out": out if out is not None else Path("runs/demo-quick") if quick else None, "engine": engine}
    return load_config(DemoConfig, recipe=recipe, flags=flags, overrides=overrides, preset=QUICK if quick else None, preset_name="--quick")

"""`distill eval`: score a model on math benchmarks under one locked, recorded protocol.

    distill eval --model runs/sft/model --benchmarks aime24,math500 --out runs/eval-sft
    distill eval --rescore runs/eval-sft          # recompute verdicts and metrics, no generation

Reported reasoning scores are often irreproducible because the settings that move them by
several points (temperature, number of samples, maximum length, engine and version, dtype,
tensor parallelism) go unrecorded. Here they are fixed by default, locked on resume, written
into metrics.json, and `distill compare` refuses to put runs with different protocols side by side.

The protocol (DeepSeek-R1 paper defaults):
- temperature 0.6, top-p 0.95, at most 32768 new tokens;
- no system prompt of our own; the user turn is the problem plus "Please reason step by step,
  and put your final answer within \\boxed{}."; rendered with the evaluated model's own chat
  template by `distill.teacher.prompts.render_prompt` (the one prompt renderer; the `<think>`
  prefill of R1-style templates is put back into the stored completion exactly once);
- k samples per problem, per-benchmark defaults (AIME 64, AMC 32, MATH-500 4, GSM8K 1;
  `distill.benchmarks`); sample i of problem p has its own seed, a hash of (seed, p, i)
  (`distill.teacher.generate.sample_seed`, the same rule as teacher sampling), so any sample is
  reproducible on its own (as far as the engine is deterministic for a given seed) and a
  resumed run draws what an uninterrupted one would;
- every completion is graded by the shared verifier (`distill.verify`: the same extraction and
  equivalence check that filters teacher traces and rewards GRPO); the verdict's `correct=None`
  (timeout, unparsable reference) counts as wrong and is counted in `verdicts`.

Outputs in RUN_DIR:
    samples/<benchmark>.jsonl  one trace record per sample: prompt, completion, tokens, finish
                               reason, seed, and in `extra` the verdict (correct, extracted,
                               verdict, format_ok). Append-only, fsynced per batch: a crash keeps
                               what finished and the same command resumes.
    protocol.json              the protocol and, per benchmark, k and the problem ids scored
    metrics.json               per benchmark: pass@1 (mean over k), its standard error and 95%
                               bootstrap CI, cons@k (majority vote), unbiased pass@k, response
                               length mean and median, truncation rate, format-failure rate; plus
                               the protocol and the environment (engine and version, dtype, tensor
                               parallelism, batch settings, seeds, GPU type, library versions,
                               wall time, GPU-hours)
    metrics.jsonl              progress, and one `session` record per invocation (its environment)

Simplifications, named: cons@k groups votes by the verifier's equivalence (`Verifier.group`:
each answer joins the first earlier answer it equals; equivalence is not always transitive, so
the classes depend on answer order); GPU-hours are wall time times the GPUs this process used (tensor-parallel
size for vllm, one for hf on CUDA; not measured for a remote openai server).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from distill.benchmarks import Benchmark, load_benchmarks
from distill.config import load_config
from distill.errors import ConfigError, DistillError, InputError
from distill.metrics import Sample, benchmark_metrics
from distill.records import TraceRecord, TraceWriter, iter_jsonl, read_traces, repair_tail
from distill.rundir import METRICS_FILE, METRICS_LOG, RunDir, read_metrics, write_json
from distill.teacher.generate import HFOptions, OpenAIOptions, VLLMOptions, engine_options, sample_seed
from distill.teacher.prompts import R1_INSTRUCTION

SAMPLES_DIR = "samples"
PROTOCOL_FILE = "protocol.json"
# Settings that define what a run directory's samples mean: a resume must not change them.
LOCKED = ("model", "engine", "max_tokens", "temperature", "top_p", "system_prompt", "instruction", "seed", "chat_template")


@dataclass(frozen=True)
class EvalConfig:
    model: str | None = None  # hub id or local model directory (e.g. a `distill train` run's model/)
    benchmarks: tuple[str, ...] = ("aime24", "math500")  # presets or JSONL files (NAME=FILE to name one)
    out: Path | None = None  # the run directory
    engine: Literal["vllm", "openai", "hf"] = "vllm"
    k: int | None = None  # samples per problem; None: the benchmark's default (AIME 64, AMC 32, MATH-500 4, GSM8K 1)
    max_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    system_prompt: str | None = None  # R1: none
    instruction: str = R1_INSTRUCTION  # appended to the problem in the user turn
    seed: int = 0  # base of every sample's own seed
    limit: int | None = None  # the first N problems of each benchmark (quick checks; recorded, compare refuses to mix)
    data_dir: Path | None = None  # local benchmark copies (../shared/data/eval layout); else $DISTILL_DATA_DIR, else the hub
    chat_template: str | None = None  # override the model's template (jinja text, .jinja or tokenizer_config.json)
    trust_remote_code: bool = False
    hf: HFOptions = field(default_factory=HFOptions)  # the engines' settings: the same sections as `distill generate`
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    openai: OpenAIOptions = field(default_factory=OpenAIOptions)
    verifier_workers: int | None = None
    verifier_timeout_s: float = 5.0
    # No box, no "answer is": "last" grades the last math span or number of the final text (as
    # math-verify does). Base models and students often answer without a box; scoring them 0 for
    # it would measure the format, not the mathematics, and bias base-vs-distilled comparisons.
    no_answer_fallback: Literal["none", "last"] = "last"
    write_every: int = 16  # completions graded and fsynced together
    rescore: Path | None = None  # recompute verdicts and metrics of this run directory; generate nothing
    name: str | None = None  # the row label in `distill compare`; default: the run directory's name

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.top_p <= 1.0 or self.temperature < 0.0:
            raise ValueError(f"need temperature >= 0 and 0 <= top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")


def run(cfg: EvalConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Evaluate (or, with `rescore`, re-grade) and return the contents of metrics.json."""
    if cfg.rescore is not None:
        return rescore(cfg.rescore, workers=cfg.verifier_workers)
    if not cfg.model:
        raise ConfigError("missing required value 'model': pass --model MODEL (a hub id or a model directory)")
    if cfg.out is None:
        raise ConfigError("missing required value 'out': pass --out RUN_DIR")
    if cfg.chat_template is not None and cfg.engine == "openai":
        raise ConfigError("chat_template applies to the hf and vllm engines; an OpenAI-compatible server uses its own (e.g. `vllm serve --chat-template`)")

    # ---- benchmarks and the protocol -----------------------------------------------------------
    benchmarks = load_benchmarks(list(cfg.benchmarks), data_dir=cfg.data_dir, limit=cfg.limit)
    protocol = protocol_of(cfg, benchmarks)
    _check_k_unchanged(Path(cfg.out), protocol)  # k is locked per benchmark (a default k may be spelled out)
    run_dir = RunDir(cfg.out, "eval", cfg, sources, locked=LOCKED)
    write_json(run_dir.file(PROTOCOL_FILE), protocol)
    run_dir.announce(f"distill eval: {cfg.model} on {', '.join(f'{b.name} ({len(b.problems)} x k={protocol_k(cfg, b)})' for b in benchmarks)} "
                     f"with {cfg.engine} -> {run_dir.path}", shown=("model", "benchmarks", "out", "engine", "k"))

    # ---- what is left to generate (resume) ------------------------------------------------------
    writers = {b.name: TraceWriter(samples_path(run_dir.path, b.name)) for b in benchmarks}
    todo: list[tuple[Benchmark, Any, int]] = []
    for benchmark in benchmarks:
        done = writers[benchmark.name].done_keys()
        todo += [(benchmark, p, i) for p in benchmark.problems for i in range(protocol_k(cfg, benchmark)) if (p.id, i) not in done]
    total = sum(len(b.problems) * protocol_k(cfg, b) for b in benchmarks)
    if run_dir.resumed and todo and len(todo) < total:
        run_dir.say(f"resuming: {total - len(todo)} of {total} samples already done")

    try:
        if todo:
            _generate_and_grade(cfg, run_dir, todo, writers, total)
    finally:
        for writer in writers.values():
            writer.close()

    # ---- metrics --------------------------------------------------------------------------------
    from distill.verify import Verifier

    with Verifier(workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s) as verifier:  # cons@k's vote groups
        metrics = compute_metrics(run_dir.path, protocol, verifier)
    metrics.update(_timing(run_dir.path))
    result = json.loads(run_dir.write_metrics(metrics).read_text(encoding="utf-8"))
    for name, figures in metrics["benchmarks"].items():
        low, high = figures.get("pass@1_ci95", [float("nan")] * 2)
        run_dir.say(
            f"{name}: pass@1 {figures.get('pass@1', float('nan')):.4f} (95% CI {low:.4f}-{high:.4f}), "
            f"cons@{figures['k']} {figures.get('cons@k', float('nan')):.4f}, {figures['samples']} samples"
        )
    return result


# --------------------------------------------------------------------------------------------
# generation and grading


def _generate_and_grade(cfg: EvalConfig, run_dir: RunDir, todo: list, writers: dict[str, TraceWriter], total: int) -> None:
    from tqdm import tqdm

    from distill.engines import Request, Sampling, make_engine
    from distill.teacher.prompts import full_completion, load_chat_template, render_prompt
    from distill.verify import Verifier, check_format

    # The engine loads the evaluated model's own tokenizer; its chat template renders the prompts
    # (None for an OpenAI-compatible server, which applies its template to the messages).
    engine = make_engine(cfg.engine, cfg.model, **engine_options(cfg))
    tokenizer = engine.tokenizer
    if cfg.chat_template is not None:
        tokenizer.chat_template = load_chat_template(cfg.chat_template)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    rendered_of: dict[tuple[str, str], Any] = {}  # (benchmark, problem id) -> RenderedPrompt
    pending: dict[str, tuple[Benchmark, Any, int, int]] = {}  # request key -> (benchmark, problem, idx, seed)
    requests: list[Request] = []
    for benchmark, problem, idx in todo:
        rendered = rendered_of.get((benchmark.name, problem.id))
        if rendered is None:
            rendered = render_prompt(tokenizer, problem.problem, system=cfg.system_prompt, instruction=cfg.instruction)
            rendered_of[(benchmark.name, problem.id)] = rendered
        key = f"{benchmark.name}/{problem.id}/{idx}"
        seed = sample_seed(cfg.seed, problem.id, idx)
        pending[key] = (benchmark, problem, idx, seed)
        requests.append(Request(key=key, prompt=rendered.text or "", sampling=sampling, seed=seed, messages=rendered.messages))

    session = uuid.uuid4().hex[:12]
    started = time.time()
    environment = environment_of(cfg, engine)
    run_dir.log_metrics({"event": "session", "session": session, "environment": environment})
    run_dir.say(f"engine {engine.name} {engine.version}; {len(requests)} samples to generate")
    sampling_record = {**dataclasses.asdict(sampling), "stop": list(sampling.stop)}
    buffer: list[tuple[Any, Any]] = []  # (completion, full text) waiting to be graded and written
    errors: list[str] = []  # samples the engine failed on: not written, retried by the next run
    done = total - len(requests)

    def flush(verifier) -> None:
        nonlocal done
        if not buffer:
            return
        verdicts = verifier.grade([(pending[c.key][1].answer, text) for c, text in buffer])
        by_benchmark: dict[str, list[TraceRecord]] = {}
        for (completion, text), verdict in zip(buffer, verdicts):
            benchmark, problem, idx, seed = pending.pop(completion.key)
            rendered = rendered_of[(benchmark.name, problem.id)]
            record = TraceRecord(
                problem_id=problem.id, sample_idx=idx, problem=problem.problem, answer=problem.answer,
                completion=text, source=benchmark.name, prompt=list(rendered.messages),
                finish_reason=completion.finish_reason, prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens, teacher=cfg.model, engine=engine.name,
                engine_version=engine.version, sampling=sampling_record, seed=seed,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                extra=_verdict_fields(verdict, check_format(text)),
            )
            by_benchmark.setdefault(benchmark.name, []).append(record)
        for name, records in by_benchmark.items():
            writers[name].write(records)
        done += len(buffer)
        buffer.clear()
        run_dir.log_metrics({"event": "progress", "session": session, "done": done, "total": total, "elapsed_s": round(time.time() - started, 3)})

    bar = tqdm(total=total, initial=done, desc="eval", unit="sample", file=sys.stderr, disable=None)
    try:
        with Verifier(workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s, no_answer_fallback=cfg.no_answer_fallback) as verifier:
            try:
                for completion in engine.generate(requests):
                    bar.update(1)
                    if completion.finish_reason == "error":
                        errors.append(f"{completion.key}: {completion.info.get('error', 'engine error')}")
                        continue
                    rendered = rendered_of[(pending[completion.key][0].name, pending[completion.key][1].id)]
                    buffer.append((completion, full_completion(rendered, completion.text)))
                    if len(buffer) >= cfg.write_every:
                        flush(verifier)
            finally:
                flush(verifier)  # Ctrl-C or an engine error: what finished is graded and kept
    finally:
        bar.close()
        engine.close()
    if pending:
        first = errors[0] if errors else next(iter(pending))
        raise DistillError(
            f"{len(pending)} sample(s) got no completion (first: {first}); finished samples are kept in "
            f"{run_dir.path / SAMPLES_DIR}; run the same command again to retry the rest"
        )


def _verdict_fields(verdict: Any, format_ok: bool) -> dict[str, Any]:
    return {"correct": verdict.correct, "extracted": verdict.extracted, "verdict": verdict.reason, "format_ok": format_ok}


# --------------------------------------------------------------------------------------------
# protocol, environment, timing


def protocol_k(cfg: EvalConfig, benchmark: Benchmark) -> int:
    return cfg.k if cfg.k is not None else benchmark.default_k


def protocol_of(cfg: EvalConfig, benchmarks: list[Benchmark]) -> dict[str, Any]:
    """What must match for two evaluations to be comparable (compare checks these)."""
    return {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "system_prompt": cfg.system_prompt,
        "instruction": cfg.instruction,
        "seed": cfg.seed,
        "seed_rule": "distill.teacher.generate.sample_seed(seed, problem_id, sample_idx)",
        "no_answer_fallback": cfg.no_answer_fallback,
        "benchmarks": {
            b.name: {
                "spec": b.spec,
                "k": protocol_k(cfg, b),
                "problems": len(b.problems),
                "problem_set": b.problem_set,
                "limit": cfg.limit,
                "problem_ids": [p.id for p in b.problems],
            }
            for b in benchmarks
        },
    }


def _check_k_unchanged(run_path: Path, protocol: Mapping[str, Any]) -> None:
    if not (run_path / PROTOCOL_FILE).is_file():
        return
    before = read_protocol(run_path)["benchmarks"]
    changed = [f"{name}: k {before[name]['k']} -> {spec['k']}" for name, spec in protocol["benchmarks"].items()
               if name in before and before[name]["k"] != spec["k"]]
    if changed:
        raise ConfigError(
            f"{run_path}: this run directory was made with other settings ({'; '.join(changed)}); "
            "use a new --out directory, or the original settings to resume"
        )


def environment_of(cfg: EvalConfig, engine: Any) -> dict[str, Any]:
    gpu_name, gpu_count = _gpus()
    options = engine_options(cfg)
    if cfg.engine == "vllm":
        replicas = cfg.vllm.data_parallel_size or max(1, gpu_count // (cfg.vllm.tensor_parallel_size * cfg.vllm.pipeline_parallel_size))
        used = cfg.vllm.tensor_parallel_size * cfg.vllm.pipeline_parallel_size * replicas
    elif cfg.engine == "hf":
        used = 1 if gpu_count and cfg.hf.device != "cpu" else 0
    else:
        used = None  # a remote server: its GPUs are not visible from here
    return {
        "engine": engine.name,
        "engine_version": engine.version,
        "dtype": options.get("dtype", "server"),
        "resolved_dtype": str(engine.model.dtype) if cfg.engine == "hf" else None,  # what "auto" became
        "tensor_parallel_size": cfg.vllm.tensor_parallel_size if cfg.engine == "vllm" else 1,
        "batch_size": cfg.hf.batch_size if cfg.engine == "hf" else cfg.vllm.max_num_seqs if cfg.engine == "vllm" else cfg.openai.max_in_flight,
        "engine_options": options,
        "seed": cfg.seed,
        "gpu": gpu_name,
        "gpu_count_visible": gpu_count,
        "gpus_used": used,
        "versions": {name: _version(name) for name in ("distill", "torch", "transformers", "vllm", "math-verify")},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def _gpus() -> tuple[str | None, int]:
    try:
        import torch
    except ImportError:
        return None, 0
    if not torch.cuda.is_available():
        return None, 0
    return torch.cuda.get_device_name(0), torch.cuda.device_count()


def _version(package: str) -> str | None:
    from distill.doctor import version_of

    return version_of(package)


def _timing(run_path: Path) -> dict[str, Any]:
    """Generation wall time summed over every session of this run directory (a resumed run
    counts each invocation's time once), and the GPU- or CPU-hours it amounts to."""
    sessions: dict[str, dict[str, Any]] = {}
    log = run_path / METRICS_LOG
    if log.is_file():
        repair_tail(log)
        for _, row in iter_jsonl(log, on_bad_row="skip"):
            session = row.get("session")
            if row.get("event") == "session":
                sessions[session] = {"environment": row.get("environment", {}), "elapsed": 0.0}
            elif row.get("event") == "progress" and session in sessions:
                sessions[session]["elapsed"] = max(sessions[session]["elapsed"], float(row.get("elapsed_s", 0.0)))
    wall = sum(s["elapsed"] for s in sessions.values())
    last = list(sessions.values())[-1]["environment"] if sessions else {}
    used = last.get("gpus_used")
    gpu_hours = wall / 3600 * used if used else (None if used is None and sessions else 0.0)
    cpu_hours = wall / 3600 if used == 0 else 0.0
    return {
        "environment": {**last, "sessions": len(sessions)},
        "generation_wall_time_s": round(wall, 3),
        "gpu_hours": gpu_hours,
        "cpu_hours": cpu_hours,
    }


# --------------------------------------------------------------------------------------------
# reading a run directory back (rescore and compare use these)


def samples_path(run_path: str | Path, benchmark: str) -> Path:
    return Path(run_path) / SAMPLES_DIR / f"{benchmark}.jsonl"


def read_protocol(run_path: str | Path) -> dict[str, Any]:
    path = Path(run_path) / PROTOCOL_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found; is {run_path} a `distill eval` run directory?")
    return json.loads(path.read_text(encoding="utf-8"))


def read_samples(run_path: str | Path, benchmark: str, problem_ids: list[str] | None = None) -> list[Sample]:
    """The graded samples of one benchmark, restricted to `problem_ids` when given (in that order)."""
    path = samples_path(run_path, benchmark)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    repair_tail(path)
    samples = [_sample_of(r) for r in read_traces(path).records]
    if problem_ids is None:
        return samples
    order = {pid: i for i, pid in enumerate(problem_ids)}
    return sorted((s for s in samples if s.problem_id in order), key=lambda s: (order[s.problem_id], s.sample_idx))


def _sample_of(record: TraceRecord) -> Sample:
    extra = record.extra
    return Sample(
        problem_id=record.problem_id,
        sample_idx=record.sample_idx,
        correct=extra.get("correct"),
        extracted=extra.get("extracted"),
        completion_tokens=int(record.completion_tokens or 0),
        finish_reason=record.finish_reason or "",
        format_ok=bool(extra.get("format_ok")),
        reason=str(extra.get("verdict") or ""),
    )


def compute_metrics(run_path: str | Path, protocol: Mapping[str, Any], verifier: Any = None) -> dict[str, Any]:
    """Every benchmark's figures. With a verifier, cons@k votes by equivalence class (`1/2`,
    `0.5` and `\\frac{1}{2}` are one vote); without one, by answer text."""
    figures = {}
    for name, spec in protocol["benchmarks"].items():
        samples = read_samples(run_path, name, spec["problem_ids"])
        if verifier is not None:
            samples = vote_by_equivalence(samples, verifier)
        figures[name] = benchmark_metrics(samples, k=spec["k"], seed=protocol.get("seed", 0), expected_problems=spec["problems"])
    public = {**protocol, "benchmarks": {n: {k: v for k, v in b.items() if k != "problem_ids"} for n, b in protocol["benchmarks"].items()}}
    return {"protocol": public, "benchmarks": figures, "compute": _inference_ledger(Path(run_path), protocol)}


def _inference_ledger(run_path: Path, protocol: Mapping[str, Any]) -> dict[str, Any]:
    """The compute ledger of this evaluation (distill.compute): every stored sample's prompt and
    completion tokens through the evaluated model; inference, not part of what making it cost."""
    from distill.compute import eval_block
    from distill.rundir import read_config

    prompt = completion = 0
    for name in protocol["benchmarks"]:
        path = samples_path(run_path, name)
        if path.is_file() and path.stat().st_size:
            for record in read_traces(path).records:
                prompt += int(record.prompt_tokens or 0)
                completion += int(record.completion_tokens or 0)
    model = read_config(run_path).get("model") if (run_path / "config.yaml").is_file() else None
    return eval_block(model, prompt, completion)


def vote_by_equivalence(samples: list[Sample], verifier: Any) -> list[Sample]:
    """The samples with each extracted answer replaced by the first equivalent answer of its
    problem (`Verifier.group`), so the majority vote (`distill.metrics`, which groups by text)
    counts equivalent spellings as one answer."""
    by_problem: dict[str, list[int]] = {}
    for index, sample in enumerate(samples):
        by_problem.setdefault(sample.problem_id, []).append(index)
    voted = list(samples)
    for indices in by_problem.values():
        answers = [samples[i].extracted for i in indices]
        for index, leader in zip(indices, verifier.group(answers)):
            if leader is not None:
                voted[index] = dataclasses.replace(samples[index], extracted=answers[leader])
    return voted


def rescore(run_path: str | Path, workers: int | None = None) -> dict[str, Any]:
    """Grade every stored completion again with the current verifier and recompute the metrics;
    a samples file whose verdicts changed is rewritten atomically. Generates nothing."""
    from distill.verify import Verifier, check_format

    run_path = Path(run_path)
    protocol = read_protocol(run_path)
    saved = load_config(EvalConfig, recipe=run_path / "config.yaml").config
    changed = 0
    with Verifier(workers=workers, timeout_s=saved.verifier_timeout_s, no_answer_fallback=saved.no_answer_fallback) as verifier:
        for name in protocol["benchmarks"]:
            path = samples_path(run_path, name)
            if not path.is_file():
                continue
            repair_tail(path)
            records = read_traces(path).records
            verdicts = verifier.grade([(r.answer, r.completion) for r in records])
            updated, changed_here = [], 0
            for record, verdict in zip(records, verdicts):
                fields = _verdict_fields(verdict, check_format(record.completion))
                if any(record.extra.get(k) != v for k, v in fields.items()):
                    changed_here += 1
                updated.append(dataclasses.replace(record, extra={**record.extra, **fields}))
            if changed_here:
                _rewrite(path, updated)
            changed += changed_here
        metrics = compute_metrics(run_path, protocol, verifier)
    metrics.update(_timing(run_path))
    try:
        previous = read_metrics(run_path)
    except ConfigError:
        previous = {}
    result = {"stage": "eval", **metrics, "rescored": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "verdicts_changed": changed}}
    if "wall_time_s" in previous:
        result["wall_time_s"] = previous["wall_time_s"]
    write_json(run_path / METRICS_FILE, result)
    print(f"rescored {run_path}: {changed} verdict(s) changed", file=sys.stderr)
    return result


def _rewrite(path: Path, records: list[TraceRecord]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with TraceWriter(tmp) as writer:
        writer.write(records)
    tmp.replace(path)


"""distill generate: sample n long chain-of-thought completions per problem from a teacher.

    distill generate --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --data math500 --out runs/gen-7b
    distill generate --recipe recipes/generate/r1-distill-32b.yaml --shard 0/4

Reads problems (a JSONL/Parquet/CSV file, a preset such as math500 or openr1-math, or a hub
dataset `name[:config][@split]`, via distill.problems), renders each with the teacher's chat
template (distill.teacher.prompts: R1 defaults, the `<think>` prefill kept), sends one request
per (problem, sample) to an engine (vllm | openai | hf, distill.engines) and writes each
completion to RUN_DIR/traces.jsonl the moment it finishes.

Choices, and what is simplified:
- Defaults are DeepSeek-R1's: temperature 0.6, top-p 0.95, up to 32768 new tokens, no system
  prompt, "Please reason step by step, and put your final answer within \\boxed{}." appended to
  the problem. n defaults to 4 samples per problem.
- Each sample has its own seed, derived from (seed, problem_id, sample_idx) by a hash, so sample
  i of a problem is the same whether it runs first, last, after a crash, or with a larger n.
- Exactly once: a record per (problem_id, sample_idx), appended to JSONL and flushed + fsynced
  every `flush_every` records or `flush_seconds`. Rerunning the same command skips what is on
  disk (a torn last line from kill -9 is cut off first), so a crash costs at most one flush
  window of samples. Failed samples (an engine's finish_reason "error") are not written: the
  run ends with a non-zero exit naming them and the next run retries them.
- A run directory keeps one teacher, prompt and sampling setting: reopening it with another
  model, system prompt, instruction, chat template, temperature, top-p, max_tokens, stop or seed
  is refused (RunDir locked keys). Raising n is allowed: it adds samples.
- `--shard I/N` (0-based) keeps the problems whose id hashes to shard I (distill.problems), and
  writes traces.shard-I-of-N.jsonl and metrics.shard-I-of-N.json, so N machines can share one
  directory (or copy theirs together); `distill filter` reads every traces*.jsonl.
- Every record carries its provenance: teacher, engine and version, sampling settings, the
  sample's seed, the prompt messages, token counts, finish reason and time.
- `top_logprobs=k` (off by default) also keeps the teacher's k most likely tokens and their
  log-probs at every generated position, for logit distillation (`distill train kd_alpha=...`):
  in a binary sidecar beside each trace file (distill/topk.py: 4 + 6k bytes per token), each
  record referencing its block. The sidecar's blocks are fsynced before the records that
  reference them are written, and on resume it is cut back to the last referenced byte, so
  resume after kill -9 keeps the two consistent. k is locked with the run directory.
- Progress (stderr): samples done, problems complete, samples/s, output tokens/s, ETA.
  metrics.json: totals over the whole trace file (samples, tokens, finish reasons) and this
  run's wall time and throughput.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping

from distill.compute import generate_block
from distill.config import to_dict
from distill.engines import Completion, Request, Sampling, make_engine
from distill.errors import ConfigError, DistillError
from distill.problems import Fields, Problem, load_problems, select_shard
from distill.records import TraceRecord, TraceWriter, iter_jsonl, record_id, repair_tail
from distill.rundir import CONFIG_FILE, RunDir, check_locked, field_defaults, write_json
from distill.teacher.prompts import R1_INSTRUCTION, RenderedPrompt, full_completion, load_chat_template, render_prompt
from distill.topk import SidecarWriter, bytes_per_token, pack, parse_reference, reference_end, repair_sidecar, sidecar_path

# Settings that define what a run directory's traces are; a resumed run must match them.
LOCKED = ("model", "system", "instruction", "chat_template", "temperature", "top_p", "max_tokens", "stop", "seed", "top_logprobs")


@dataclass(frozen=True)
class HFOptions:
    batch_size: int = 16  # rows decoded together
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU


@dataclass(frozen=True)
class VLLMOptions:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int | None = None  # replicas; None = every visible GPU // (tp * pp)
    gpu_memory_utilization: float | None = None  # None: vLLM's 0.9 on GPUs; on CPU the KV cache is sized in GiB instead
    kv_cache_gib: float | None = None  # None: on CPU $VLLM_CPU_KVCACHE_SPACE, else 1/4 of free memory (at most 4)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True  # the n samples of a problem share their prompt's KV
    dtype: str = "auto"
    distributed_executor_backend: str | None = None  # "ray" for a teacher spanning nodes
    max_num_seqs: int | None = None
    max_queued: int = 2048  # requests held in the engine at once
    extra: dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM argument, e.g. kv_cache_dtype


@dataclass(frozen=True)
class OpenAIOptions:
    base_url: str | None = None  # default $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    max_in_flight: int = 64
    timeout_s: float = 3600.0  # per request: a 32k-token trace takes minutes
    max_retries: int = 8
    max_connection_failures: int = 8  # in a row, over all requests: the server is gone, the run stops
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields, e.g. {top_k: 20}


@dataclass(frozen=True)
class GenerateConfig:
    model: str  # teacher: hub id or path (hf, vllm), or the served model name (openai)
    data: str  # problems: file, preset (math500, gsm8k, openr1-math, ...) or hub name[:config][@split]
    out: Path  # run directory
    engine: Literal["vllm", "openai", "hf"] = "vllm"
    n: int = 4  # samples per problem
    max_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    stop: tuple[str, ...] = ()
    shard: str | None = None  # "I/N", 0-based
    system: str | None = None  # R1: no system prompt
    instruction: str = R1_INSTRUCTION  # appended to the problem in the user turn
    chat_template: str | None = None  # override the tokenizer's: jinja text, .jinja or tokenizer_config.json
    fields: dict[str, str | None] = field(default_factory=dict)  # column names: problem, answer, id
    data_dir: Path | None = None  # local copies of presets (e.g. ../shared/data/eval)
    limit: int | None = None  # only the first N problems of the source
    on_bad_row: Literal["error", "skip"] = "error"
    top_logprobs: int = 0  # > 0: keep the teacher's top-k log-probs of every generated token (sidecar, distill/topk.py)
    flush_every: int = 16  # records per fsync'd write
    flush_seconds: float = 5.0  # ... or this long, whichever comes first
    trust_remote_code: bool = False
    # the teacher's N for the compute ledger (distill.compute) when its weights are not on this
    # machine (a served model) or to override what they say; a mixture of experts: the active ones
    model_params: float | None = None
    hf: HFOptions = field(default_factory=HFOptions)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    openai: OpenAIOptions = field(default_factory=OpenAIOptions)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {self.flush_every}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0 (0 = off), got {self.top_logprobs}")
        unknown = set(self.fields) - {f.name for f in dataclasses.fields(Fields)}
        if unknown:
            raise ValueError(f"fields: unknown name(s) {', '.join(sorted(unknown))}; map problem, answer and id")
        parse_shard(self.shard)


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; None stays None."""
    if shard is None:
        return None
    index, sep, count = str(shard).partition("/")
    try:
        pair = (int(index), int(count))
    except ValueError:
        pair = None
    if not sep or pair is None or pair[1] < 1 or not 0 <= pair[0] < pair[1]:
        raise ValueError(f"shard '{shard}' is not I/N with 0 <= I < N (e.g. --shard 0/4)")
    return pair


def sample_seed(seed: int, problem_id: str, sample_idx: int) -> int:
    """The seed of one sample: a hash of (run seed, problem id, sample index), in [0, 2^31)."""
    digest = hashlib.sha256(f"{seed}\x00{problem_id}\x00{sample_idx}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def trace_file_name(shard: tuple[int, int] | None) -> str:
    return "traces.jsonl" if shard is None else f"traces.shard-{shard[0]}-of-{shard[1]}.jsonl"


def run(cfg: GenerateConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    started = time.time()
    shard = parse_shard(cfg.shard)
    if cfg.chat_template is not None and cfg.engine == "openai":
        raise ConfigError("chat_template applies to the hf and vllm engines; an OpenAI-compatible server uses its own (e.g. `vllm serve --chat-template`)")

    # ---- problems: every bad row is reported before a model is loaded
    fields = Fields(**{**dataclasses.asdict(Fields()), **cfg.fields}) if cfg.fields else None
    loaded = load_problems(cfg.data, fields=fields, data_dir=cfg.data_dir, on_bad_row=cfg.on_bad_row, limit=cfg.limit)
    problems = loaded.problems if shard is None else select_shard(loaded.problems, *shard)

    # ---- resume: refuse a changed teacher / prompt / sampling, then find what is already on disk
    out = Path(cfg.out)
    if (out / CONFIG_FILE).exists():
        check_locked(out / CONFIG_FILE, to_dict(cfg), LOCKED, field_defaults(cfg))
    trace_path = out / trace_file_name(shard)
    repair_tail(trace_path)  # a line torn by kill -9 mid-write is cut off
    existing = scan_traces(trace_path)
    topk_path = sidecar_path(trace_path)
    if cfg.top_logprobs or topk_path.exists():
        repair_sidecar(topk_path, existing.topk_end)  # a tail written without its records is cut off
    todo: dict[str, tuple[Problem, int]] = {}  # request key -> (problem, sample_idx), in problem order
    for problem in problems:
        for sample_idx in range(cfg.n):
            if (problem.id, sample_idx) not in existing.keys:
                todo[record_id(problem.id, sample_idx)] = (problem, sample_idx)

    # ---- engine (only when there is work): a missing [gpu] extra, an unloadable teacher or an
    # unreachable server stop here, before the run directory is made
    engine = make_engine(cfg.engine, cfg.model, **engine_options(cfg)) if todo else None
    engine_name = engine.name if engine else cfg.engine
    engine_version = engine.version if engine else existing.engine_version or "unknown"
    tokenizer = engine.tokenizer if engine else None
    if tokenizer is not None and cfg.chat_template is not None:
        tokenizer.chat_template = load_chat_template(cfg.chat_template)
    # Prompts are rendered as their requests are handed to the engine and dropped once their
    # problem's last sample is written: memory holds the prompts in flight, not one per problem
    # (800k problems of a large run).
    rendered: dict[str, RenderedPrompt] = {}
    remaining = Counter(problem.id for problem, _ in todo.values())  # samples still missing per problem

    def prompt_of(problem: Problem) -> RenderedPrompt:
        if problem.id not in rendered:
            rendered[problem.id] = render_prompt(tokenizer, problem.problem, system=cfg.system, instruction=cfg.instruction)
        return rendered[problem.id]

    if todo:  # a prompt the template cannot render stops the run here, before the run directory is made
        prompt_of(next(iter(todo.values()))[0])

    run_dir = RunDir(out, "generate", cfg, sources, locked=LOCKED)
    writer = TraceWriter(trace_path)
    sidecar = SidecarWriter(topk_path) if cfg.top_logprobs else None
    complete = sum(1 for p in problems if p.id not in remaining)
    run_dir.announce(
        f"distill generate: teacher {cfg.model} on {engine_name} ({engine_version}), {len(problems)} problems x n={cfg.n} from {cfg.data}"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else "") + f" -> {out}",
        shown=("model", "data", "out", "engine", "n", "shard"),
    )
    run_dir.say(
        f"{len(existing.keys)} samples already in {trace_path.name}, " + (f"{len(todo)} to go" if todo else "nothing to do")
        + (f"; skipped {len(loaded.skipped)} bad rows" if loaded.skipped else "")
    )
    for message in loaded.skipped[:20]:
        run_dir.log.info("skipped: %s", message)
    run_dir.warn_dropped("malformed", len(loaded.skipped), len(loaded.problems) + len(loaded.skipped), "problem rows skipped as malformed (on_bad_row=skip)", "fix those rows (generate.log names the first 20)")

    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, stop=tuple(cfg.stop), top_logprobs=cfg.top_logprobs)
    requests = (
        Request(
            key=key,
            prompt=prompt_of(problem).text or "",
            sampling=sampling,
            seed=sample_seed(cfg.seed, problem.id, sample_idx),
            messages=prompt_of(problem).messages,
        )
        for key, (problem, sample_idx) in todo.items()
    )
    provenance = {
        "teacher": cfg.model,
        "engine": engine_name,
        "engine_version": engine_version,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "n": cfg.n,
                     **({"stop": list(cfg.stop)} if cfg.stop else {})},
    }

    # ---- generate: write each completion as it finishes
    stats = RunStats()
    buffer: list[TraceRecord] = []
    blocks: list[bytes] = []  # top-k blocks of the buffered records, in the same order
    generation_started = last_flush = last_log = time.time()
    progress = _progress(len(todo), complete, len(problems))

    def flush() -> None:
        nonlocal last_flush
        if sidecar is not None:  # the blocks reach the disk before the records that point at them
            for record, offset in zip(buffer, sidecar.append(blocks)):
                record.top_logprobs = {"file": topk_path.name, "offset": offset, "tokens": record.top_logprobs["tokens"], "k": cfg.top_logprobs}
            blocks.clear()
        writer.write(buffer)
        buffer.clear()
        last_flush = time.time()

    try:
        for completion in engine.generate(requests) if engine else ():
            problem, sample_idx = todo[completion.key]
            progress.update(1)
            if completion.finish_reason == "error":
                stats.errors.append(f"{completion.key}: {completion.info.get('error', 'engine error')}")
                continue
            record = _record(cfg, problem, sample_idx, prompt_of(problem), completion, provenance)
            if sidecar is not None:
                blocks.append(_topk_block(completion, cfg.top_logprobs, engine_name))
                record.top_logprobs = {"tokens": len(completion.token_ids)}  # the offset is known when flushed
                stats.topk_tokens += len(completion.token_ids)
            buffer.append(record)
            stats.add(completion)
            remaining[problem.id] -= 1
            if remaining[problem.id] == 0:
                complete += 1
                rendered.pop(problem.id, None)
            now = time.time()
            if len(buffer) >= cfg.flush_every or now - last_flush >= cfg.flush_seconds:
                flush()
                progress.set_postfix_str(_rates(stats, now - generation_started, complete, len(problems)), refresh=False)
                if now - last_log >= 10:
                    run_dir.log_metrics(stats.snapshot(now - generation_started, complete))
                    last_log = now
        generation_ended = time.time()  # before the engine's shutdown, which is not generation
    finally:
        # Ctrl-C, an engine error: what finished is kept, and the same command resumes.
        if buffer:
            flush()
        writer.close()
        if sidecar is not None:
            sidecar.close()
        progress.set_postfix_str(_rates(stats, time.time() - generation_started, complete, len(problems)))
        progress.close()
        if engine:
            engine.close()

    # ---- metrics: totals over the whole trace file, and this run's throughput
    wall = time.time() - started
    generation = generation_ended - generation_started
    totals = existing.merged(stats)
    metrics = {
        "teacher": cfg.model,
        "engine": engine_name,
        "engine_version": engine_version,
        "data": cfg.data,
        "shard": cfg.shard,
        "trace_file": trace_path.name,
        "problems": len(problems),
        "problems_complete": complete,
        "samples": totals["samples"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
        "finish_reasons": totals["finish_reasons"],
        "skipped_rows": len(loaded.skipped),
        "run": stats.snapshot(generation, complete),  # this invocation, generation only (no model load)
        "errors": len(stats.errors),
        "retries": getattr(engine, "retries", 0),
        "compute": generate_block(cfg.model, totals["prompt_tokens"], totals["completion_tokens"], cfg.model_params),
    }
    if cfg.top_logprobs or existing.topk_tokens:
        topk_tokens = existing.topk_tokens + stats.topk_tokens
        metrics["top_logprobs"] = {
            "k": cfg.top_logprobs,
            "file": topk_path.name,
            "tokens": topk_tokens,
            "bytes": topk_path.stat().st_size if topk_path.exists() else 0,
            "bytes_per_token": bytes_per_token(cfg.top_logprobs),  # 4 + 6k: sampled id, k ids (int32), k log-probs (float16)
        }
    run_dir.log_metrics(stats.snapshot(generation, complete))
    if shard is None:
        run_dir.write_metrics(metrics)
    else:
        write_json(run_dir.file(f"metrics.shard-{shard[0]}-of-{shard[1]}.json"), {"stage": "generate", "wall_time_s": round(wall, 3), **metrics})
    run_dir.say(
        f"wrote {stats.samples} samples ({stats.completion_tokens} output tokens) in {wall:.1f}s to {trace_path}; "
        f"{totals['samples']} in total, {complete}/{len(problems)} problems complete"
    )
    if stats.errors:
        for message in stats.errors:
            run_dir.log.error(message)
        raise DistillError(
            f"{len(stats.errors)} samples failed (first: {stats.errors[0]}); finished samples are kept in {trace_path}; "
            "rerun the same command to retry the failed ones"
        )
    return metrics


def engine_options(cfg: GenerateConfig) -> dict[str, Any]:
    """The chosen engine's options from its config section (keys are the engine's arguments)."""
    if cfg.engine == "hf":
        return {**to_dict(cfg.hf), "trust_remote_code": cfg.trust_remote_code}
    if cfg.engine == "vllm":
        return {**to_dict(cfg.vllm), "seed": cfg.seed, "trust_remote_code": cfg.trust_remote_code}
    return to_dict(cfg.openai)


# --------------------------------------------------------------------------------------------
# records, resume state, progress


def _topk_block(completion: Completion, k: int, engine: str) -> bytes:
    """The sidecar block of one completion; an engine that returned no top-k is a one-line error."""
    if completion.top_logprobs is None or completion.token_ids is None:
        raise DistillError(f"engine {engine} returned no top-k log-probs for {completion.key}; top_logprobs={k} needs an engine that "
                           "returns them (hf, vllm, or a server that answers `top_logprobs`), or top_logprobs=0")
    if len(completion.top_logprobs) != len(completion.token_ids):
        raise DistillError(f"engine {engine} returned {len(completion.top_logprobs)} top-k rows for {len(completion.token_ids)} tokens "
                           f"of {completion.key}; they must match one to one")
    return pack(completion.token_ids, completion.top_logprobs, k)


def _record(cfg: GenerateConfig, problem: Problem, sample_idx: int, rendered: RenderedPrompt,
            completion: Completion, provenance: Mapping[str, Any]) -> TraceRecord:
    return TraceRecord(
        problem_id=problem.id,
        sample_idx=sample_idx,
        problem=problem.problem,
        answer=problem.answer,
        completion=full_completion(rendered, completion.text),  # "<think>" prefill put back once
        source=problem.source,
        prompt=[dict(m) for m in rendered.messages],
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        seed=sample_seed(cfg.seed, problem.id, sample_idx),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **provenance,
    )


@dataclass
class RunStats:
    samples: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    topk_tokens: int = 0  # generated tokens whose top-k went to the sidecar

    def add(self, completion: Completion) -> None:
        self.samples += 1
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.finish_reasons[completion.finish_reason] += 1

    def snapshot(self, seconds: float, problems_complete: int) -> dict[str, Any]:
        seconds = max(seconds, 1e-9)
        return {
            "samples": self.samples,
            "completion_tokens": self.completion_tokens,
            "problems_complete": problems_complete,
            "wall_time_s": round(seconds, 3),
            "samples_per_s": round(self.samples / seconds, 3),
            "output_tokens_per_s": round(self.completion_tokens / seconds, 1),
            "finish_reasons": dict(self.finish_reasons),
            "errors": len(self.errors),
        }


@dataclass
class Existing:
    keys: set[tuple[str, int]]
    engine_version: str | None = None  # of the last record, for a run with nothing left to do
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    topk_end: int = 0  # the sidecar byte after the last block a record references
    topk_tokens: int = 0

    def merged(self, stats: RunStats) -> dict[str, Any]:
        return {
            "samples": len(self.keys) + stats.samples,
            "prompt_tokens": self.prompt_tokens + stats.prompt_tokens,
            "completion_tokens": self.completion_tokens + stats.completion_tokens,
            "finish_reasons": dict(self.finish_reasons + stats.finish_reasons),
        }


def scan_traces(path: Path) -> Existing:
    """Keys and totals of the records already written, streamed (a trace file can be many GB)."""
    existing = Existing(keys=set())
    if not path.exists() or path.stat().st_size == 0:
        return existing
    for number, row in iter_jsonl(path):
        try:
            key = (str(row["problem_id"]), int(row["sample_idx"]))
        except (KeyError, TypeError, ValueError):
            raise DistillError(f"{path}:{number}: not a distill trace record (no problem_id / sample_idx); use a new --out directory") from None
        if key in existing.keys:
            continue  # never written twice by us; tolerate a hand-merged file
        existing.keys.add(key)
        existing.prompt_tokens += int(row.get("prompt_tokens") or 0)
        existing.completion_tokens += int(row.get("completion_tokens") or 0)
        existing.finish_reasons[row.get("finish_reason") or "unknown"] += 1
        existing.engine_version = row.get("engine_version") or existing.engine_version
        reference = parse_reference(row.get("top_logprobs"), f"{path}:{number}")
        if reference:
            existing.topk_end = max(existing.topk_end, reference_end(reference))
            existing.topk_tokens += int(reference["tokens"])
    return existing


def _progress(total: int, complete: int, problems: int) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="sample", desc="generate", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    bar.set_postfix_str(f"problems {complete}/{problems}", refresh=False)
    return bar


def _rates(stats: RunStats, seconds: float, complete: int, problems: int) -> str:
    seconds = max(seconds, 1e-9)
    return f"problems {complete}/{problems}, {stats.completion_tokens / seconds:.0f} tok/s"


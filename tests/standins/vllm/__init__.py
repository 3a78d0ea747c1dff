"""A STAND-IN for the parts of vLLM's API that distill/engines/vllm.py calls. It is not vLLM.

The adapter is tested against the real vLLM (vLLM's CPU build) everywhere vLLM can run on CPU.
This imitation is kept only for what needs GPUs: tensor and pipeline parallelism, and replicas
spread over GPUs (tests/test_engines_vllm.py, the last test). It imitates:
`LLM(**engine_args)`, `LLM.get_tokenizer()`, `LLM.reset_prefix_cache()`,
`LLM.llm_engine.add_request(request_id, prompt, params)` / `.step()` / `.abort_request(ids)`,
`SamplingParams(n, temperature, top_p, max_tokens, seed, stop, stop_token_ids, output_kind)`,
`RequestOutput(request_id, prompt_token_ids, outputs, finished)`, `EngineArgs` (its field
names) and `ModelRegistry.get_supported_archs()`.

It checks argument names strictly (an unknown engine argument is a TypeError, as in vLLM) and
schedules like a continuous-batching engine: up to `max_num_seqs` requests decode one token per
`step()`, the rest wait, and requests finish in the order their (seeded) lengths dictate, not the
order they were added. Text is decoded from seeded random token ids with the model's tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

__version__ = "0.0.0+standin"

# Engine arguments the stand-in accepts: the EngineArgs names the adapter uses.
ENGINE_ARGS = {
    "model", "tokenizer", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
    "gpu_memory_utilization", "max_model_len", "enable_prefix_caching", "dtype", "seed",
    "distributed_executor_backend", "max_num_seqs", "trust_remote_code", "kv_cache_memory_bytes", "enable_chunked_prefill",
    "enforce_eager", "hf_overrides",
}
INSTANCES: list["LLM"] = []  # every LLM built in this process, for tests to inspect


@dataclass
class EngineArgs:  # the field names only: the adapter checks extra= against them
    model: str = ""
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    seed: int = 0
    distributed_executor_backend: str | None = None
    max_num_seqs: int | None = None
    trust_remote_code: bool = False


class ModelRegistry:
    @staticmethod
    def get_supported_archs() -> list[str]:
        return ["Qwen2ForCausalLM", "LlamaForCausalLM"]


class SamplingParams:
    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int | None = 16,
                 seed: int | None = None, stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                 output_kind: Any = None):
        if n != 1:
            raise ValueError("the stand-in supports n=1 only")
        self.n, self.temperature, self.top_p, self.max_tokens, self.seed, self.stop = n, temperature, top_p, max_tokens, seed, stop
        self.stop_token_ids, self.output_kind = stop_token_ids, output_kind


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class _Running:
    request_id: str
    prompt_token_ids: list[int]
    planned: list[int]
    finish_reason: str
    produced: int = 0


class _Engine:
    def __init__(self, tokenizer: Any, eos_token_id: int, max_num_seqs: int):
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`: decode only, light to import
        self.eos_token_id = eos_token_id
        self.max_num_seqs = max_num_seqs
        self.waiting: list[_Running] = []
        self.running: list[_Running] = []
        self.added = 0
        self.peak_unfinished = 0

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams) -> None:
        if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
            raise TypeError("the stand-in expects a TokensPrompt: {'prompt_token_ids': [...]}")
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be SamplingParams")
        rng = random.Random(params.seed)
        eos = self.eos_token_id
        length = rng.randint(1, params.max_tokens)
        planned = [rng.randrange(200, 5000) for _ in range(length)]
        # Greedy is deterministic: at temperature 0 the seed does not matter.
        if params.temperature == 0:
            planned = [300 + (sum(prompt["prompt_token_ids"]) + i) % 1000 for i in range(params.max_tokens)]
        reason = "length" if len(planned) >= params.max_tokens else "stop"
        if reason == "stop":
            planned.append(eos)
        self.waiting.append(_Running(request_id, list(prompt["prompt_token_ids"]), planned, reason))
        self.added += 1
        self.peak_unfinished = max(self.peak_unfinished, len(self.waiting) + len(self.running))

    def abort_request(self, request_ids: list[str]) -> None:
        self.waiting = [r for r in self.waiting if r.request_id not in request_ids]
        self.running = [r for r in self.running if r.request_id not in request_ids]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[RequestOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.pop(0))
        outputs = []
        for request in list(self.running):
            request.produced += 1
            done = request.produced >= len(request.planned)
            ids = request.planned[: request.produced]
            text_ids = ids[:-1] if done and request.finish_reason == "stop" else ids
            outputs.append(RequestOutput(
                request.request_id, request.prompt_token_ids,
                [CompletionOutput(0, self.tokenizer.decode(text_ids, skip_special_tokens=True), ids,
                                  request.finish_reason if done else None)],
                done,
            ))
            if done:
                self.running.remove(request)
        return outputs


class LLM:
    def __init__(self, model: str, **engine_args: Any):
        unknown = set(engine_args) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"unexpected engine arguments: {sorted(unknown)}")
        import json
        from pathlib import Path

        from tokenizers import Tokenizer

        folder = Path(engine_args.get("tokenizer") or model)
        if not (folder / "tokenizer.json").is_file():
            raise OSError(f"stand-in: {model} is not a local model directory with a tokenizer.json")
        eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
        self._folder = folder
        self.engine_args = {"model": model, **engine_args}
        self.llm_engine = _Engine(Tokenizer.from_file(str(folder / "tokenizer.json")), eos, engine_args.get("max_num_seqs") or 4)
        self.prefix_cache_resets = 0
        INSTANCES.append(self)

    def get_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._folder)

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        return True

"""One generation layer for every stage: teacher sampling, evaluation and GRPO rollouts.

An engine takes already-rendered prompts (the chat template is applied once, by the caller,
with the tokenizer of the model being sampled) and yields completions as they finish, so a
caller can write each one to disk at once and never waits on the slowest sample of a batch.

Each request is one sample with its own seed: sample i of a problem is reproducible on its own,
which is what makes resume-after-crash produce the same records as an uninterrupted run, and
what the eval protocol's "each sample with its own fixed seed" means.

Engines:
    hf      transformers `generate`, batched; CPU and small GPUs; tests and the demo use it
    vllm    vLLM in-process (the [gpu] extra)
    openai  any OpenAI-compatible server (vllm serve, SGLang, hosted APIs)

`make_engine` imports only the engine asked for, so a machine without vLLM never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request. Defaults are the DeepSeek-R1 paper's."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    key: str  # the caller's handle, e.g. "problem_id/sample_idx"; echoed in the Completion
    prompt: str  # the rendered prompt text (chat template applied, generation prompt included)
    sampling: Sampling
    seed: int  # this sample's own seed
    messages: tuple[dict[str, str], ...] = ()  # the chat messages behind `prompt` (the openai engine sends these)


@dataclass
class Completion:
    key: str
    text: str  # the generated text only (not the prompt)
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None  # generated ids when the engine has them (GRPO needs them)
    info: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    name: str  # "hf" | "vllm" | "openai"
    version: str  # version of the library or server behind it, recorded in every trace

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yield one Completion per request, in the order they finish (not request order)."""
        ...

    def close(self) -> None: ...

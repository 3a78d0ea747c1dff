"""One generation layer for every stage: teacher sampling, evaluation and GRPO rollouts.

An engine takes already-rendered prompts (the chat template is applied once, by the caller,
with the tokenizer of the model being sampled) and yields completions as they finish, so a
caller can write each one to disk at once and never waits on the slowest sample of a batch.

Each request is one sample with its own seed: sample i of a problem is reproducible on its own,
which is what makes resume-after-crash produce the same records as an uninterrupted run, and
what the eval protocol's "each sample with its own fixed seed" means.

Engines:
    hf      transformers `generate`, batched; CPU and small GPUs; tests and the demo use it
    vllm    vLLM in-process (the [gpu] extra; without a GPU, vLLM's CPU build from `make setup`)
    openai  any OpenAI-compatible server (vllm serve, SGLang, hosted APIs)

`make_engine` imports only the engine asked for, so a machine without vLLM never imports it.
Engines that render prompts locally (hf, vllm) expose the model's tokenizer as `.tokenizer`
(None for openai, where the server applies its own chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import inspect
from typing import Any, Iterable, Iterator, Protocol

from distill.errors import ConfigError

ENGINES = ("hf", "vllm", "openai")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request. Defaults are the DeepSeek-R1 paper's."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    stop: tuple[str, ...] = ()
    # > 0: also return, at every generated position, the k most likely tokens and their
    # log-probs under the model's own distribution (temperature 1, before top-p): what logit
    # distillation trains on (Completion.top_logprobs). 0: nothing extra (the default).
    top_logprobs: int = 0


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
    # Sampling.top_logprobs = k > 0: one (ids, logprobs) pair of k-long lists per generated
    # token, in token_ids' order, most likely first; log-probs at temperature 1.
    top_logprobs: list[tuple[list[int], list[float]]] | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """Score a given completion under the engine's model: log p(completion_ids[t] | prompt_ids +
    completion_ids[:t]) for every t, at temperature 1. The ids are the engine's own tokenizer's
    (the caller checks the tokenizers match: on-policy distillation scores the student's tokens
    with the teacher)."""

    key: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


@dataclass
class Scored:
    key: str
    logprobs: list[float]  # one per completion token
    info: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    name: str  # "hf" | "vllm" | "openai"
    version: str  # version of the library or server behind it, recorded in every trace
    tokenizer: Any  # the model's tokenizer when prompts are rendered locally, else None

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yield one Completion per request, in the order they finish (not request order)."""
        ...

    def score(self, requests: Iterable[ScoreRequest]) -> Iterator[Scored]:
        """Yield one Scored per request (any order): the model's log-probs of given tokens, the
        teacher's side of on-policy distillation."""
        ...

    def close(self) -> None: ...


def make_engine(name: str, model: str | None = None, *, tokenizer: Any = None, hf_model: Any = None, **options: Any) -> Engine:
    """Build engine `name` for `model` (a hub id, a path, or a served model name for openai).

    `hf_model` (hf only) samples from a model already in memory, e.g. the policy GRPO trains.
    `options` are the engine's own settings (hf: batch_size, device, dtype; vllm:
    tensor_parallel_size, gpu_memory_utilization, ...; openai: base_url, max_in_flight, ...);
    an unknown one is a ConfigError naming it.
    """
    if name == "hf":
        from distill.engines.hf import HFEngine as cls
    elif name == "vllm":
        from distill.engines.vllm import VLLMEngine as cls
    elif name == "openai":
        from distill.engines.openai import OpenAIEngine as cls
    else:
        raise ConfigError(f"engine: unknown engine '{name}'; choose one of {', '.join(ENGINES)}")
    accepted = inspect.signature(cls.__init__).parameters
    if hf_model is not None:
        if "hf_model" not in accepted:
            raise ConfigError(f"engine {name}: hf_model= (a model in memory) is only for the hf engine")
        options["hf_model"] = hf_model
    if tokenizer is not None:
        if "tokenizer" not in accepted:
            raise ConfigError(f"engine {name}: takes no tokenizer (the server applies its own chat template)")
        options["tokenizer"] = tokenizer
    unknown = sorted(set(options) - set(accepted) - {"self"})
    if unknown:
        known = sorted(k for k in accepted if k not in ("self", "model", "tokenizer", "hf_model"))
        raise ConfigError(f"engine {name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(model, **options)

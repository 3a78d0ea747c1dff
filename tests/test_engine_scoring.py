"""The teacher's token distribution from the hf engine: `score` (log p of given tokens, the
teacher's side of on-policy distillation) and `Sampling.top_logprobs` (the k best tokens of every
generated position, what logit distillation trains on)."""

from __future__ import annotations

import pytest
import torch

from distill.engines import Request, Sampling, ScoreRequest, make_engine
from distill.students.logprobs import token_logprobs

PROMPTS = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Count: one two three four five six"]


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    return make_engine("hf", str(tiny_qwen), batch_size=4)


def score_requests(engine) -> list[ScoreRequest]:
    """Prompts of different lengths with completions of different lengths (one empty)."""
    encode = lambda text: tuple(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return [
        ScoreRequest("a", encode(PROMPTS[0]), encode("4, because two and two make four.")),
        ScoreRequest("b", encode(PROMPTS[1]), encode(" seven eight")),
        ScoreRequest("c", encode("Hi"), encode(" there, how are you doing today?")),
        ScoreRequest("d", encode(PROMPTS[1]), ()),
    ]


def test_score_equals_the_training_loops_logprobs(engine):
    reqs = score_requests(engine)
    scored = {s.key: s.logprobs for s in engine.score(reqs)}
    assert set(scored) == {r.key for r in reqs}
    for r in reqs:
        ids = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)])
        with torch.no_grad():
            reference = token_logprobs(engine.model, ids)[0, len(r.prompt_ids) - 1 : -1]  # (completion,)
        assert len(scored[r.key]) == len(r.completion_ids)
        assert torch.allclose(torch.tensor(scored[r.key]), reference, atol=1e-5), r.key
        assert all(v <= 0 for v in scored[r.key])


def test_batch_composition_does_not_change_scores(engine):
    reqs = score_requests(engine)
    engine.batch_size = 1
    alone = {s.key: s.logprobs for s in engine.score(reversed(reqs))}
    engine.batch_size = 4
    together = {s.key: s.logprobs for s in engine.score(reqs)}
    for key in alone:
        assert torch.allclose(torch.tensor(alone[key]), torch.tensor(together[key]), atol=1e-5), key


def test_score_of_an_in_memory_model_keeps_training_mode(tiny_qwen, engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    model.train()
    reqs = score_requests(engine)
    mine = {s.key: s.logprobs for s in make_engine("hf", hf_model=model, tokenizer=engine.tokenizer).score(reqs)}
    assert model.training, "score must leave the model in training mode"
    for s in engine.score(reqs):
        assert torch.allclose(torch.tensor(mine[s.key]), torch.tensor(s.logprobs), atol=1e-5)


def test_empty_prompt_is_a_one_line_error(engine):
    from distill.errors import DistillError

    with pytest.raises(DistillError, match="score request 'x': empty prompt_ids"):
        list(engine.score([ScoreRequest("x", (), (1, 2))]))


def test_top_logprobs_do_not_change_the_samples(engine):
    def sample(k: int):
        sampling = Sampling(temperature=0.8, top_p=0.9, max_tokens=5, top_logprobs=k)
        batch = [Request(key=f"{i}/{s}", prompt=p, sampling=sampling, seed=s) for i, p in enumerate(PROMPTS) for s in (3, 4)]
        return {c.key: c for c in engine.generate(batch)}

    plain, with_top = sample(0), sample(5)
    vocab = engine.model.config.vocab_size
    for key, completion in plain.items():
        assert completion.top_logprobs is None
        assert with_top[key].token_ids == completion.token_ids, key
        tops = with_top[key].top_logprobs
        assert len(tops) == len(completion.token_ids)
        for ids, values in tops:
            assert len(ids) == len(values) == 5
            assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
            assert all(0 <= i < vocab for i in ids) and len(set(ids)) == 5


def test_top_logprobs_agree_with_scoring_the_sample(engine):
    # At temperature 1 and top-p 1 the engine samples from exactly the distribution it reports;
    # with k = the vocabulary, the sampled token's entry is there and must equal its score.
    vocab = engine.model.config.vocab_size
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=4, top_logprobs=vocab)
    batch = [Request(key=str(i), prompt=p, sampling=sampling, seed=i) for i, p in enumerate(PROMPTS)]
    completions = list(engine.generate(batch))
    prompts = {str(i): tuple(engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for i, p in enumerate(PROMPTS)}
    scored = {s.key: s.logprobs for s in engine.score(ScoreRequest(c.key, prompts[c.key], tuple(c.token_ids)) for c in completions)}
    for c in completions:
        reported = [dict(zip(ids, values))[token] for token, (ids, values) in zip(c.token_ids, c.top_logprobs)]
        assert torch.allclose(torch.tensor(reported), torch.tensor(scored[c.key]), atol=1e-4), c.key
        # a full-vocabulary list is the whole distribution: its probabilities sum to 1
        assert abs(torch.tensor(c.top_logprobs[0][1]).logsumexp(0).item()) < 1e-4

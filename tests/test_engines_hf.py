"""The transformers engine: per-sample seeds independent of batching, greedy = model.generate,
token ids and finish reasons, an in-memory model (GRPO's policy), exact nucleus sampling."""

from __future__ import annotations

import collections

import pytest
import torch

from distill.engines import Request, Sampling, make_engine
from distill.engines import hf as hf_engine
from distill.errors import ConfigError, DistillError

PROMPTS = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Count: one two three four five six"]


def requests(sampling: Sampling, seeds=(11, 12)) -> list[Request]:
    return [Request(key=f"{p}/{s}", prompt=prompt, sampling=sampling, seed=seed)
            for p, prompt in enumerate(PROMPTS) for s, seed in enumerate(seeds)]


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    return make_engine("hf", str(tiny_qwen), batch_size=6)


def test_a_sample_does_not_depend_on_its_batch(engine):
    batch = requests(Sampling(temperature=0.6, top_p=0.95, max_tokens=4))
    engine.batch_size = 4  # both prompts (different lengths: left padding) in one batch
    together = {c.key: c for c in engine.generate(batch)}
    engine.batch_size = 1  # every sample alone, in reverse order
    alone = {c.key: c for c in engine.generate(reversed(batch))}
    engine.batch_size = 6
    assert set(together) == {r.key for r in batch}
    for key in together:
        assert together[key].token_ids == alone[key].token_ids, key
        assert together[key].text == alone[key].text
    # The seed is what varies samples of one prompt.
    assert together["0/0"].token_ids != together["0/1"].token_ids


def test_greedy_matches_model_generate(engine):
    batch = [Request(key=str(i), prompt=p, sampling=Sampling(temperature=0, max_tokens=6), seed=i) for i, p in enumerate(PROMPTS)]
    mine = {c.key: c for c in engine.generate(batch)}
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        reference = engine.model.generate(**ids, do_sample=False, max_new_tokens=6)[0, ids["input_ids"].shape[1]:].tolist()
        assert mine[str(i)].token_ids == reference
        assert mine[str(i)].finish_reason == "length" and mine[str(i)].completion_tokens == 6
        assert mine[str(i)].prompt_tokens == ids["input_ids"].shape[1]


def test_in_memory_model_stops_at_eos_and_keeps_training_mode(tiny_qwen):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    model.train()
    probe = Request(key="p", prompt=PROMPTS[0], sampling=Sampling(temperature=0, max_tokens=3), seed=0)
    first = next(iter(make_engine("hf", hf_model=model, tokenizer=tokenizer).generate([probe]))).token_ids[0]
    # Make the greedy first token the end-of-sequence token: the row must stop there.
    model.generation_config.eos_token_id = first
    engine = make_engine("hf", hf_model=model, tokenizer=tokenizer)
    (completion,) = engine.generate([probe])
    assert completion.finish_reason == "stop"
    assert completion.token_ids == [first]  # the eos id is kept in token_ids ...
    assert completion.text == "" and completion.completion_tokens == 1  # ... and left out of the text
    assert model.training, "generate must leave the policy in training mode"


def test_stop_strings_end_the_sample(engine):
    (plain,) = engine.generate([Request(key="a", prompt=PROMPTS[1], sampling=Sampling(temperature=0, max_tokens=6), seed=0)])
    stop = plain.text[len(plain.text) // 2:][:2]
    assert stop, "the greedy text is long enough to cut"
    (cut,) = engine.generate([Request(key="a", prompt=PROMPTS[1], sampling=Sampling(temperature=0, max_tokens=6, stop=(stop,)), seed=0)])
    assert cut.finish_reason == "stop" and stop not in cut.text and plain.text.startswith(cut.text)


def test_nucleus_sampling_is_exact():
    # Four tokens with probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.75 keeps the first two only,
    # in the ratio 5:3; temperature 1.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    rows = 4000
    reqs = [Request(key=str(i), prompt="", sampling=Sampling(temperature=1.0, top_p=0.75), seed=i) for i in range(rows)]
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    tokens = hf_engine.sample_tokens(logits.expand(rows, 4), reqs, generators)
    counts = collections.Counter(tokens.tolist())
    assert set(counts) == {0, 1}
    assert abs(counts[0] / rows - 0.5 / 0.8) < 0.03


def test_candidate_check_and_full_sort_agree(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3  # (b, V)
    reqs = [Request(key=str(i), prompt="", sampling=Sampling(temperature=0.7, top_p=0.5), seed=i) for i in range(64)]

    def draw(candidates: int):
        monkeypatch.setattr(hf_engine, "_CANDIDATES", candidates)
        return hf_engine.sample_tokens(logits, reqs, [torch.Generator().manual_seed(i) for i in range(64)])

    # 300 candidates never fall back to sorting; 1 candidate falls back for every row whose best
    # perturbed token lies outside the nucleus (about half of them at top_p 0.5).
    assert torch.equal(draw(300), draw(1))


def test_bad_engine_options_and_models_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown option.*batchsize"):
        make_engine("hf", "x", batchsize=2)
    with pytest.raises(ConfigError, match="unknown engine"):
        make_engine("tgi", "x")
    with pytest.raises(DistillError, match="cannot load the tokenizer of"):
        make_engine("hf", str(tmp_path / "no-such-model"))

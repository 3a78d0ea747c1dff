"""The test bed itself: tiny models load offline with the real tokenizers and run a forward pass."""

from __future__ import annotations

import os

import pytest

from conftest import TOKENIZERS


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_llama"])
def test_tiny_model_loads_offline_and_runs(fixture, request):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    ids = tokenizer("What is 2+2?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_real_tokenizers_are_used_when_present(tiny_qwen):
    from transformers import AutoTokenizer

    if not (TOKENIZERS / "qwen2.5-instruct" / "tokenizer.json").is_file():
        pytest.skip("needs ../shared/data/tokenizers/qwen2.5-instruct")
    assert len(AutoTokenizer.from_pretrained(tiny_qwen)) == 151665

"""The local character tokenizer loads back token for token, also where transformers swaps in
its own tokenizer class for the model type (Qwen2Tokenizer rebuilds the pipeline)."""

from __future__ import annotations

import string

import pytest

from distill.chartok import build_char_tokenizer

TEXTS = [
    "a\nb c",
    "<think>\n47+85=132\n132-36=96\n</think>\n\\boxed{96}",
    "  two  spaces\n\n\ttab, 'quotes' and naïve ünïcödé ∑ 中文",
    "Compute 9-3.",
]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_saved_char_tokenizer_loads_back_identically(tmp_path, family):
    from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = build_char_tokenizer(string.printable)
    config = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family](vocab_size=len(tokenizer), hidden_size=8, num_attention_heads=1)
    config.save_pretrained(tmp_path)  # config.json decides the tokenizer class AutoTokenizer uses
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert loaded(text).input_ids == ids, f"{type(loaded).__name__} tokenizes {text!r} differently"
        assert loaded.decode(ids) == text == tokenizer.decode(ids)
    ascii_text = TEXTS[1]
    assert len(tokenizer(ascii_text).input_ids) == len(ascii_text) - len("<think></think>") + 2, "one token per ASCII character"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"

"""Prompt rendering: R1 defaults, the R1-Distill `<think>` prefill kept in the stored completion."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import shared_path
from distill.errors import ConfigError
from distill.teacher.prompts import R1_INSTRUCTION, full_completion, load_chat_template, render_prompt

PROBLEM = "What is $1+1$?"


@pytest.fixture(scope="module")
def qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("tokenizers/qwen2.5-instruct"))


def with_template(tokenizer, template: str):
    """A shallow copy of `tokenizer` with another chat template (the original keeps its own)."""
    other = copy.copy(tokenizer)
    other.chat_template = template
    return other


@pytest.fixture
def r1(qwen):
    """The Qwen2.5 tokenizer with DeepSeek-R1-Distill-Qwen's chat template (same BPE vocabulary)."""
    config = shared_path("tokenizers/deepseek-r1-distill-qwen/tokenizer_config.json")
    return with_template(qwen, json.loads(config.read_text(encoding="utf-8"))["chat_template"])


def test_r1_defaults_no_system_prompt_and_the_boxed_instruction(r1):
    rendered = render_prompt(r1, PROBLEM)
    assert rendered.messages == ({"role": "user", "content": PROBLEM + R1_INSTRUCTION},)
    assert R1_INSTRUCTION == "\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert rendered.text.startswith("<｜User｜>" + PROBLEM + R1_INSTRUCTION)
    assert rendered.text.endswith("<｜Assistant｜><think>\n")


def test_r1_template_prefill_is_put_back_exactly_once(r1):
    rendered = render_prompt(r1, PROBLEM)
    assert rendered.prefill == "<think>\n"
    generated = "1 plus 1 is 2.\n</think>\n\nThe answer is \\boxed{2}."  # what the model emits after the prefill
    stored = full_completion(rendered, generated)
    assert stored == "<think>\n1 plus 1 is 2.\n</think>\n\nThe answer is \\boxed{2}."
    assert stored.count("<think>") == 1 and stored.count("</think>") == 1
    # An engine that echoes the prefill does not get it twice.
    assert full_completion(rendered, stored) == stored


def test_chatml_template_opens_no_think_block(qwen):
    rendered = render_prompt(qwen, "Is <think> a tag?")  # a problem mentioning the tag is not a prefill
    assert rendered.prefill == ""
    assert rendered.text.endswith("<|im_start|>assistant\n")
    assert full_completion(rendered, "plain answer") == "plain answer"


def test_system_prompt_and_instruction_are_configurable(qwen):
    rendered = render_prompt(qwen, PROBLEM, system="Be brief.", instruction=None)
    assert rendered.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBLEM})
    assert "Be brief." in rendered.text and "You are Qwen" not in rendered.text


def test_a_closed_empty_think_block_is_a_prefill_too(qwen):
    tokenizer = with_template(qwen, (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
    ))
    rendered = render_prompt(tokenizer, PROBLEM)
    assert rendered.prefill == "<think>\n\n</think>\n\n"
    assert full_completion(rendered, "2") == "<think>\n\n</think>\n\n2"


def test_server_rendered_prompt_gets_its_opening_tag_back():
    rendered = render_prompt(None, PROBLEM)  # an OpenAI-compatible server applies the template
    assert rendered.text is None and rendered.prefill == ""
    assert full_completion(rendered, "thinking\n</think>\n\n2") == "<think>\nthinking\n</think>\n\n2"
    assert full_completion(rendered, "<think>\nx\n</think>\n2") == "<think>\nx\n</think>\n2"
    assert full_completion(rendered, "no reasoning at all") == "no reasoning at all"


def test_chat_template_from_a_tokenizer_config(tmp_path):
    config = shared_path("tokenizers/deepseek-r1-distill-qwen/tokenizer_config.json")
    assert "<｜Assistant｜><think>" in load_chat_template(str(config))
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ConfigError, match="neither a file"):
        load_chat_template(str(tmp_path / "missing.jinja"))

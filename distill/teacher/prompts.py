"""Prompt rendering: the one place a problem becomes the text a model is asked to continue.

`distill generate`, `distill eval` and `distill grpo` all call `render_prompt`, so a teacher, a
student under evaluation and a policy under RL see a problem the same way.

Defaults are DeepSeek-R1's (paper, section 2 and the R1-Distill model cards):
- no system prompt of our own (a chat template that inserts its default one, as Qwen2.5's does,
  still does: we render what the model's own template renders);
- the user turn is the problem followed by R1_INSTRUCTION
  ("\\nPlease reason step by step, and put your final answer within \\boxed{}.");
- the prompt is rendered with the model tokenizer's chat template, generation prompt included.

The `<think>` prefill: DeepSeek-R1-Distill templates end the generation prompt with
`<｜Assistant｜><think>\\n`, so the model's generated text starts *inside* the reasoning and the
opening tag is part of the prompt, not of the output. Storing only the generated text would
lose `<think>` (the trace would no longer parse as reasoning + answer, and SFT on it would teach
the student to skip the tag). `render_prompt` finds that prefill in the text the template adds
for the assistant turn, and `full_completion` puts it back exactly once, so a stored completion
always holds the whole `<think> ... </think>` block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.errors import ConfigError

R1_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class RenderedPrompt:
    messages: tuple[dict[str, str], ...]  # the chat messages sent, before the assistant turn
    text: str | None  # the prompt text with the generation prompt; None without a local tokenizer
    prefill: str  # what the template already opened the assistant turn with ("<think>\n" or "")


def user_message(problem: str, instruction: str | None = R1_INSTRUCTION) -> str:
    return problem + (instruction or "")


def render_prompt(
    tokenizer: Any | None,
    problem: str,
    *,
    system: str | None = None,
    instruction: str | None = R1_INSTRUCTION,
) -> RenderedPrompt:
    """The chat messages for `problem`, and (given a tokenizer) the prompt text and its prefill.

    Without a tokenizer (an OpenAI-compatible server renders its own template) only the
    messages are built; `full_completion` then repairs a missing `<think>` from the output.
    """
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_message(problem, instruction)})
    if tokenizer is None:
        return RenderedPrompt(tuple(messages), None, "")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model') or 'this model'} has no chat template; "
            "set chat_template=PATH_OR_JINJA (e.g. the teacher's tokenizer_config.json) in the recipe"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return RenderedPrompt(tuple(messages), text, think_prefill(text, without))


def think_prefill(with_generation_prompt: str, without_generation_prompt: str) -> str:
    """The part of the generation prompt from its last `<think>` on ("" when it opens none).

    Only the text the template adds for the assistant turn is searched, so a problem that itself
    mentions `<think>` is not mistaken for a prefill. Covers "<think>\\n" (R1-Distill) and an
    already closed block such as "<think>\\n\\n</think>\\n\\n" (templates with thinking switched off).
    """
    shared = 0
    for a, b in zip(with_generation_prompt, without_generation_prompt):
        if a != b:
            break
        shared += 1
    added = with_generation_prompt[shared:]
    index = added.rfind(THINK_OPEN)
    return added[index:] if index >= 0 else ""


def full_completion(rendered: RenderedPrompt, generated: str) -> str:
    """The whole assistant text to store: prefill + generated text, with `<think>` exactly once.

    - The template opened the reasoning (prefill "<think>\\n"): prepend it, unless the engine
      already returned it (some servers echo it).
    - No prefill known (an OpenAI-compatible server applied its own template) and the text
      closes a reasoning block it never opened: the server's template prefilled `<think>`, so
      put the opening tag back.
    """
    prefill = rendered.prefill
    if prefill:
        if generated.lstrip().startswith(THINK_OPEN):
            return generated
        return prefill + generated
    if THINK_CLOSE in generated and THINK_OPEN not in generated.split(THINK_CLOSE, 1)[0]:
        return THINK_OPEN + "\n" + generated
    return generated


def load_chat_template(value: str) -> str:
    """A chat template given as a jinja string, a .jinja file, or a tokenizer_config.json."""
    from pathlib import Path

    looks_like_path = "{" not in value and len(value) < 4096
    if not looks_like_path:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"chat_template: {value} is neither a file nor a jinja template; pass a .jinja file, a tokenizer_config.json or the template text")
    if path.suffix == ".json":
        import json

        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as error:
            raise ConfigError(f"chat_template: {path} is not valid JSON ({error})") from None
        if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise ConfigError(f"chat_template: {path} has no 'chat_template' string")
        return template
    return path.read_text(encoding="utf-8")

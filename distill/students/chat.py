"""Chat templates for students: the documented templates for base models, and how one is chosen.

Base models (Qwen2.5-Math, Qwen2.5, Llama-3.1) ship no template fit for reasoning, so a student
preset names one of these. Each is the family's usual turn format with one addition, taken from
DeepSeek-R1-Distill and open-r1: the generation prompt opens the assistant turn with `<think>\\n`,
so the student always starts by reasoning. Everything else is deliberately plain:

- no default system prompt (DeepSeek-R1's advice: put every instruction in the user turn);
- assistant content is rendered verbatim, reasoning included, in every turn. (R1-Distill's own
  template cuts past assistant turns down to the text after `</think>`; we do not, because a
  training example rendered that way trains on answers without their reasoning.)

Training renders conversations through `distill.students.data.encode`, which keeps the full
assistant text whatever the template does to it, and moves the `<think>\\n` prefill to the
prompt side (at inference it is given, not generated). The exported model directory carries the
template in its tokenizer, so `distill eval` and vLLM render prompts exactly as training did.

| name           | turns                                                              | end of turn   |
|----------------|--------------------------------------------------------------------|---------------|
| `chatml-think` | `<|im_start|>{role}\\n{content}<|im_end|>\\n`                        | `<|im_end|>`  |
| `chatml`       | the same, generation prompt without the `<think>\\n` prefill        | `<|im_end|>`  |
| `llama3-think` | BOS, `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` | `<|eot_id|>`  |
| `llama3`       | the same, generation prompt without the `<think>\\n` prefill        | `<|eot_id|>`  |
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distill.errors import ConfigError

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n" "PREFILL" "' }}{%- endif %}"
)
_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n" "PREFILL" "' }}{%- endif %}"
)
THINK_PREFILL = "<think>\n"


@dataclass(frozen=True)
class Template:
    name: str
    source: str  # the Jinja text
    end_of_turn: str  # the token that closes an assistant turn (trained on; generation stops there)
    specials: tuple[str, ...]  # strings that must be single tokens in the tokenizer


TEMPLATES: dict[str, Template] = {
    "chatml-think": Template("chatml-think", _CHATML.replace("PREFILL", "<think>\\n"), "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "chatml": Template("chatml", _CHATML.replace("PREFILL", ""), "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3-think": Template(
        "llama3-think", _LLAMA3.replace("PREFILL", "<think>\\n"), "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    ),
    "llama3": Template("llama3", _LLAMA3.replace("PREFILL", ""), "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


def resolve_template(choice: str, tokenizer, end_of_turn: str | None = None) -> Template:
    """The template a run uses, checked against its tokenizer.

    `choice`: "auto" (the tokenizer's own; a preset sets its template by name instead),
    "model" (the tokenizer's own), a name in TEMPLATES, or a path to a .jinja file.
    `end_of_turn` overrides the token that closes assistant turns (default: the named template's,
    else the tokenizer's eos token).
    """
    if choice == "auto":
        choice = "model"
    if choice in TEMPLATES:
        template = TEMPLATES[choice]
    elif choice == "model":
        source = getattr(tokenizer, "chat_template", None)
        if not source or not isinstance(source, str):
            raise ConfigError(
                "the student's tokenizer has no chat template; set chat_template= one of "
                f"{', '.join(TEMPLATES)} (or a .jinja file)"
            )
        template = Template("model", source, tokenizer.eos_token or "", ())
    elif choice.endswith((".jinja", ".j2", ".jinja2")):
        path = Path(choice)
        if not path.is_file():
            raise ConfigError(f"chat_template: {path} not found; give a .jinja file or one of {', '.join(TEMPLATES)}")
        template = Template(path.name, path.read_text(encoding="utf-8"), tokenizer.eos_token or "", ())
    else:
        raise ConfigError(f"chat_template: unknown template '{choice}'; use auto, model, one of {', '.join(TEMPLATES)}, or a .jinja file")
    if end_of_turn:
        template = Template(template.name, template.source, end_of_turn, template.specials)
    if not template.end_of_turn:
        raise ConfigError("the tokenizer has no eos token to close assistant turns; set end_of_turn= (e.g. end_of_turn='<|im_end|>')")
    vocab = tokenizer.get_vocab()
    for special in (*template.specials, template.end_of_turn):
        if special not in vocab:
            raise ConfigError(
                f"chat template '{template.name}' needs the token {special!r}, which the student's tokenizer lacks; "
                "choose the template of the model's family (chatml-think for Qwen, llama3-think for Llama) or chat_template=model"
            )
    return template


def apply_template(tokenizer, template: Template) -> None:
    """Make the tokenizer render with `template` and stop at its end of turn (for export and eval)."""
    tokenizer.chat_template = template.source
    if tokenizer.eos_token != template.end_of_turn:
        tokenizer.eos_token = template.end_of_turn

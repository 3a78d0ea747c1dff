"""The length check: does the whole conversation fit the student's maximum sequence length?

Counted in the student's tokenizer as the student will see it in training: the prompt rendered
by the student's chat template with the generation prompt, then the completion, then one
end-of-turn token. (Counted in two pieces rather than rendering the assistant turn through the
template, because some templates, DeepSeek-R1's among them, drop the reasoning of assistant
turns when rendering a finished conversation; the two-piece count is the training length.)

`--student` is a student preset name (when `distill.students.presets` provides one) or anything
`AutoTokenizer.from_pretrained` loads: a hub id or a local directory.
"""

from __future__ import annotations

from typing import Any, Sequence

from distill.errors import ConfigError

DEFAULT_MAX_SEQ_LEN = 32768  # DeepSeek-R1's generation limit, when neither preset nor flag says


class StudentLength:
    def __init__(self, student: str, max_seq_len: int | None = None):
        tokenizer_name, preset_len = _resolve_student(student)
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        except Exception as error:  # missing dir, offline hub, bad files: all the user's to fix
            first = (str(error).splitlines() or [type(error).__name__])[0][:160]
            raise ConfigError(
                f"--student {student}: could not load its tokenizer from '{tokenizer_name}' ({first}); "
                "pass a student preset, a local tokenizer directory or a reachable hub id"
            ) from None
        self.student = student
        self.max_seq_len = max_seq_len or preset_len or DEFAULT_MAX_SEQ_LEN
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))

    def count(self, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str]) -> list[int]:
        """Tokens of each whole conversation (prompt messages + completion + end of turn)."""
        if self.has_template:
            rendered = [
                self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
                for messages in prompts
            ]
        else:
            rendered = ["\n".join(m["content"] for m in messages) + "\n" for messages in prompts]
        prompt_ids = self.tokenizer(rendered, add_special_tokens=not self.has_template)["input_ids"]
        completion_ids = self.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        return [len(p) + len(c) + 1 for p, c in zip(prompt_ids, completion_ids)]


def _resolve_student(student: str) -> tuple[str, int | None]:
    """(tokenizer name, max sequence length or None) of a preset, or (student, None)."""
    try:
        from distill.students.presets import PRESETS  # lands with the SFT stage
    except ImportError:
        return student, None
    preset: Any = PRESETS.get(student) if isinstance(PRESETS, dict) else None
    if preset is None:
        return student, None
    get = preset.get if isinstance(preset, dict) else (lambda key, default=None: getattr(preset, key, default))
    name = get("tokenizer") or get("model") or get("model_id") or student
    length = get("max_seq_len") or get("max_seq_length") or get("seq_len")
    return str(name), int(length) if length else None

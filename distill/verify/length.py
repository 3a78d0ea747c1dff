"""The length check: does the whole conversation fit the student's maximum sequence length?

Counted exactly as `distill train --student P` will count it, by the training code itself: the
conversation rendered with the chat template training uses (the preset's, e.g. chatml-think;
else the model's own), split into prompt and trained segments and tokenized by
`distill.students.data` (the one place that does it), compared with the `max_seq_len` training
uses. So a trace the filter accepts is never dropped as too long by training.

`max_seq_len` comes, in order, from: the filter's own `max_seq_len`; for a student preset, the
smallest of its `max_seq_len` and those of its memory plans (llama-70b trains at 16k on one GPU,
and the filter cannot know on how many GPUs training will run: set max_seq_len= to use a larger
plan's); else what training defaults to, the model's context capped at 32768.

`--student` is a student preset name, or a local model directory or hub id (what `distill
train --student` takes); a directory holding only a tokenizer works too (then 32768 or
max_seq_len=).
"""

from __future__ import annotations

from typing import Sequence

from distill.errors import ConfigError

DEFAULT_MAX_SEQ_LEN = 32768  # what training caps a model's context at


class StudentLength:
    def __init__(self, student: str, max_seq_len: int | None = None, chat_template: str | None = None):
        from transformers import AutoTokenizer

        from distill.students.chat import resolve_template
        from distill.students.presets import PRESETS, is_preset, preset_limits

        preset = is_preset(student)
        model_id = PRESETS[student]["model"] if preset else student
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        except Exception as error:  # missing dir, offline hub, gated, bad files: the true cause, as train says it
            from distill.hub import model_error

            cause = model_error(model_id, error, f"--student {student}: its tokenizer", gated=preset and PRESETS[student].get("gated", False))
            raise ConfigError(str(cause)) from None  # a bad --student value
        choice = chat_template or (PRESETS[student]["config"].get("chat_template") if preset else None) or "auto"
        self.template = resolve_template(choice, self.tokenizer)
        self.student = student
        if max_seq_len:
            self.max_seq_len, self.source = max_seq_len, "max_seq_len="
        elif preset and preset_limits(student):
            self.max_seq_len, self.source = preset_limits(student)
        else:
            self.max_seq_len, self.source = _model_limit(model_id), "the model's context (training's default)"

    def count(self, conversations: Sequence[list[dict[str, str]]]) -> list[int]:
        """Tokens of each whole conversation, as training encodes it."""
        from distill.students.data import render_segments, tokenize_segments

        rendered = [render_segments(messages, self.tokenizer, self.template) for messages in conversations]
        return [len(example) for example in tokenize_segments(rendered, self.tokenizer)]


def _model_limit(model_id: str) -> int:
    from distill.students.sft import default_max_seq_len

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError):  # a directory with a tokenizer only: no model to train yet
        return DEFAULT_MAX_SEQ_LEN
    return default_max_seq_len(config)

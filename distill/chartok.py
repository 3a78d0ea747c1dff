"""A character-level tokenizer built locally (no hub): for the toy world and for tests on
machines without ../shared/data. Every character of `alphabet` is one token; `specials` (e.g.
"<|im_start|>") and `words` (e.g. "<think>") are single tokens matched before splitting.
"""

from __future__ import annotations

from typing import Sequence

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_char_tokenizer(
    alphabet: str,
    specials: Sequence[str] = CHATML_SPECIALS,
    words: Sequence[str] = ("<think>", "</think>"),
    chat_template: str = CHATML_TEMPLATE,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
):
    """A transformers PreTrainedTokenizerFast; characters outside `alphabet` map to <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in ["<unk>", *specials, *words, *dict.fromkeys(alphabet)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=[s for s in specials if s not in (eos_token, pad_token)],
    )
    tokenizer.add_tokens(list(words))  # matched whole, before the per-character split
    tokenizer.chat_template = chat_template
    return tokenizer

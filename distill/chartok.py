"""A character-level tokenizer built locally (no hub): for the toy world and for tests on
machines without ../shared/data. Every character of `alphabet` is one token; `specials` (e.g.
"<|im_start|>") and `words` (e.g. "<think>") are single tokens matched before splitting.

It is built as a byte-level BPE with no merges, in exactly the form transformers' Qwen2Tokenizer
rebuilds: transformers 5 loads any `model_type: qwen2` directory with Qwen2Tokenizer whatever
its tokenizer_config says, and that class re-creates the pipeline (Qwen2 split regex, ByteLevel,
NFC) around the saved vocabulary. A plain character vocabulary would then lose every space and
newline (they are "Ġ" and "Ċ" in byte-level form); this one loads back token for token. All
256 byte symbols are in the vocabulary (the alphabet's first), so no text is ever unknown or
dropped, and ASCII characters are one token each.
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
    """A transformers tokenizer: one token per byte (ASCII: per character), the alphabet's first."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for token in ["<unk>", *specials, *words]:
        vocab.setdefault(token, len(vocab))
    for byte in [*alphabet.encode("utf-8"), *range(256)]:
        vocab.setdefault(symbols[byte], len(vocab))
    # The same components as transformers' Qwen2Tokenizer (see the module docstring).
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
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


# transformers' Qwen2Tokenizer pre-tokenizer pattern (models/qwen2/tokenization_qwen2.py).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol map that ByteLevel uses (" " -> "Ġ", "\\n" -> "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols

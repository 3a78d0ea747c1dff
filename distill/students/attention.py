"""Which attention kernel a student trains with, and `sdpa_varlen`: packed sequences on torch's
own scaled-dot-product attention, for machines without flash-attn (every CPU, many GPUs).

Shared by `distill train` and `distill grpo` (both load the student through
`sft.load_student`, which calls `resolve_attention`).

A packed micro-batch is one row of several sequences whose position ids restart at 0 for each
(students/data.py). With `attn_implementation="sdpa"`, transformers detects the restarts and
builds a (T, T) boolean mask that is causal inside each sequence and False across them; SDPA
then computes every score of the T x T square and throws most of them away, and the masked
kernel is slower per score than the causal one. With `sdpa_varlen`:

- the mask function returns no mask for a row with no padding and no cache (training and
  scoring), so no (T, T) tensor is built;
- the attention function splits each row at the position-id restarts (the rule transformers
  uses: a position that is not the previous one plus 1 opens a sequence) and runs SDPA with
  `is_causal=True` on each sequence alone, so the work is sum(L^2), not (sum L)^2, and each
  piece gets the fast causal kernel (flash on CUDA, the flash CPU kernel on CPU);
- anything else (a padding mask, a KV cache during generation, sliding windows, custom masks)
  goes to transformers' own `sdpa` mask and attention unchanged, so GRPO's padded batches and
  the hf engine's generation through the training model compute exactly what `sdpa` computes.

Why not flex_attention: torch has no flex_attention backward on CPU ("FlexAttention does not
support backward on CPU", torch 2.13), and uncompiled it materialises the full score matrix; on
GPU it compiles per shape, and GRPO's hf rollouts generate through the policy with a growing
KV cache, where a compiled block mask per decoding step is far slower than SDPA.
`attn_implementation=flex_attention` remains available for `distill train` on GPUs;
bench/gpu_check.py measures both there. Measured on CPU in docs/benchmarks.md.
"""

from __future__ import annotations

import weakref

from distill.errors import ConfigError, MissingDependency

VARLEN = "sdpa_varlen"
_registered = False
_last_split: list = [None, None]  # (weakref to position_ids, lengths): the layers of one forward share one split


def resolve_attention(requested: str, device) -> str:
    """The `attn_implementation` to load a student with. "auto": flash_attention_2 on CUDA when
    flash-attn is installed, else sdpa_varlen (CPU, and GPUs without flash-attn)."""
    if requested == "auto":
        requested = "flash_attention_2" if device.type == "cuda" and _has_flash_attn() else VARLEN
    if requested == "flash_attention_2" and not _has_flash_attn():
        raise MissingDependency("flash-attn", "gpu", "attn_implementation=flash_attention_2")
    if requested == "flex_attention" and device.type != "cuda":
        raise ConfigError("attn_implementation=flex_attention cannot train on CPU (torch has no flex_attention backward there); use attn_implementation=auto")
    if requested == VARLEN:
        register()
    return requested


def register() -> None:
    """Make `sdpa_varlen` known to transformers (idempotent). Called before a model is loaded
    with it; importing this module registers nothing."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    _registered = True


def varlen_mask(*args, **kwargs):
    """No mask for a full causal square with no padding (training, scoring, a first prefill);
    transformers' sdpa mask otherwise. Keyword names differ between transformers versions
    (q_length or cache_position), so only what all of them pass is read."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    cache_position = kwargs.get("cache_position")
    q_length = kwargs.get("q_length", cache_position.shape[0] if cache_position is not None else None)
    plain = (
        not args
        and q_length is not None
        and q_length == kwargs.get("kv_length")
        and _is_zero(kwargs.get("q_offset", 0))
        and _is_zero(kwargs.get("kv_offset", 0))
        and kwargs.get("local_size") is None  # sliding window
        and not kwargs.get("use_vmap", False)  # custom (or/and) mask functions
        and (attention_mask is None or bool(attention_mask.all()))
    )
    return None if plain else sdpa_mask(*args, **kwargs)


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def varlen_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query (B, H, T, D), key/value (B, KV, T, D) -> ((B, T, H, D), None), as transformers'
    attention functions return. Packed rows (no mask, position ids restarting) are split into
    their sequences; everything else is transformers' sdpa_attention_forward."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    if attention_mask is None and position_ids is not None and query.shape[2] > 1 and key.shape[2] == query.shape[2] and getattr(module, "is_causal", True):
        lengths = sequence_lengths(position_ids)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    unsupported = [name for name in ("softcap", "s_aux", "position_bias") if kwargs.get(name) is not None]
    if unsupported:  # per-sequence SDPA would silently drop them
        raise ConfigError(f"attn_implementation={VARLEN} does not support {', '.join(unsupported)} (this model uses it); use attn_implementation=eager")
    if len(lengths) != query.shape[0]:  # position ids given as (1, T) for a batch of identical layouts
        lengths = lengths * query.shape[0]
    options = {name: kwargs[name] for name in ("dropout", "scaling") if name in kwargs}
    rows = []
    for row, row_lengths in enumerate(lengths):
        pieces = zip(*(tensor[row : row + 1].split(row_lengths, dim=2) for tensor in (query, key, value)))
        # torch.split, not slicing: its backward is one concatenation, where each slice's backward
        # would allocate and add a zero tensor of the whole row.
        outputs = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **options)[0] for q, k, v in pieces]
        rows.append(torch.cat(outputs, dim=1))  # (1, T, H, D)
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def sequence_lengths(position_ids) -> list[list[int]] | None:
    """Lengths of the sequences packed in each row of position_ids (B, T), or None when every row
    holds one sequence. Every layer of a forward gets the same position_ids tensor, so the split
    (one host sync) is computed once per forward and reused for that tensor."""
    cached, lengths = _last_split
    if cached is not None and cached() is position_ids:
        return lengths
    import torch

    ids = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
    starts = torch.diff(ids, dim=-1) != 1  # (B, T-1): position t+1 opens a sequence
    if not bool(starts.any()):
        lengths = None
    else:
        width = ids.shape[1]
        lengths = []
        for row in starts.cpu():
            edges = [0] + (row.nonzero()[:, 0] + 1).tolist() + [width]
            lengths.append([b - a for a, b in zip(edges, edges[1:])])
    _last_split[:] = [weakref.ref(position_ids), lengths]
    return lengths


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True

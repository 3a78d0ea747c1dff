"""Per-token log-probabilities and summed cross-entropy of a causal LM, without full logits.

Shared by `distill train` (the SFT loss) and `distill grpo` (policy and reference log-probs), so
both compute the same numbers with the same code.

A 32k-token sequence over Qwen's 152k vocabulary has 5 billion logits (20 GB in fp32): they are
never materialised. The decoder's final hidden states (B, T, H) are computed once; only the
positions that have a target are projected through the LM head, in chunks of `chunk_tokens`,
and each chunk is wrapped in activation checkpointing so its logits are freed after the forward
and recomputed in the backward: peak memory is one chunk's logits, whatever T is. On CUDA with
liger-kernel installed, the summed loss uses liger's fused linear cross-entropy instead (same
number, no chunk logits kept at all).

`Scorer` wraps a Hugging Face causal LM (plain, peft-wrapped or FSDP-sharded) as a module whose
forward returns these quantities; under FSDP2 it is the root module, so the embedding, final
norm and LM head are gathered by its hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from distill.errors import MissingDependency

IGNORE = -100


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face *ForCausalLM under a peft wrapper or a Scorer."""
    if isinstance(model, Scorer):
        model = model.model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def final_hidden_states(model: nn.Module, input_ids, position_ids=None, attention_mask=None):
    """(B, T, H) hidden states after the decoder's final norm. use_cache=False matters: with a
    cache (or an attention mask) transformers does not read packed-sequence boundaries from
    position_ids, and packed sequences would attend to each other."""
    decoder = causal_lm(model).get_decoder()
    output = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    return output.last_hidden_state


def _head(model: nn.Module):
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return head, softcap


def _chunk_logprobs(hidden, weight, bias, targets, softcap):
    # hidden (N, H), weight (V, H), targets (N,) -> (N,) log p(target)
    logits = F.linear(hidden, weight, bias).float()  # (N, V), fp32 for a stable log-sum-exp
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def logprobs_from_hidden(hidden, head: nn.Module, targets, chunk_tokens: int = 1024, softcap=None):
    """(B, T) log p(targets) from hidden states (B, T, H); 0 where targets == IGNORE."""
    batch, length, width = hidden.shape
    flat_targets = targets.reshape(-1)
    picked = (flat_targets != IGNORE).nonzero(as_tuple=True)[0]  # positions that have a target
    rows = hidden.reshape(-1, width).index_select(0, picked)  # (N, H)
    wanted = flat_targets.index_select(0, picked)
    pieces = []
    for start in range(0, rows.shape[0], chunk_tokens):
        args = (rows[start : start + chunk_tokens], head.weight, head.bias, wanted[start : start + chunk_tokens], softcap)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    values = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0
    out = values.new_zeros(batch * length).index_put((picked,), values)
    return out.view(batch, length)


def token_logprobs(model: nn.Module, input_ids, position_ids=None, targets=None, attention_mask=None, chunk_tokens: int = 1024):
    """(B, T) log-probability of `targets` (default: the next input token) at each position; 0
    where the target is IGNORE. Packed rows: pass position ids restarting per sequence and no
    attention mask, with targets already shifted inside each sequence."""
    if targets is None:
        targets = torch.full_like(input_ids, IGNORE)
        targets[:, :-1] = input_ids[:, 1:]
        if attention_mask is not None:
            targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE
    hidden = final_hidden_states(model, input_ids, position_ids, attention_mask)
    head, softcap = _head(model)
    return logprobs_from_hidden(hidden, head, targets, chunk_tokens, softcap)


def summed_nll(model: nn.Module, input_ids, position_ids, targets, attention_mask=None, chunk_tokens: int = 1024, fused: str = "auto"):
    """Sum over trained positions of -log p(target): a scalar. `fused`: "auto" (liger on CUDA when
    installed, else chunked), "liger" (required), "chunked"."""
    hidden = final_hidden_states(model, input_ids, position_ids, attention_mask)
    head, softcap = _head(model)
    if fused != "chunked" and hidden.is_cuda and not softcap:
        liger = _liger(required=fused == "liger")
        if liger is not None:
            return liger(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), bias=head.bias, ignore_index=IGNORE, reduction="sum")
    elif fused == "liger":
        raise MissingDependency("liger-kernel", "gpu", "fused_loss=liger (a CUDA device and liger-kernel)")
    return -logprobs_from_hidden(hidden, head, targets, chunk_tokens, softcap).sum()


def _liger(required: bool):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        if required:
            raise MissingDependency("liger-kernel", "gpu", "fused_loss=liger") from None
        return None
    return liger_fused_linear_cross_entropy


class Scorer(nn.Module):
    """A causal LM as a module returning per-token log-probs (reduction="none", (B, T)) or the
    summed NLL (reduction="sum", scalar). The root module for FSDP2 sharding."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024, fused: str = "auto"):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.fused = fused

    def forward(self, input_ids, position_ids=None, targets=None, attention_mask=None, reduction: str = "none"):
        if reduction == "sum":
            return summed_nll(self.model, input_ids, position_ids, targets, attention_mask, self.chunk_tokens, self.fused)
        return token_logprobs(self.model, input_ids, position_ids, targets, attention_mask, self.chunk_tokens)

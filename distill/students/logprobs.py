"""Per-token log-probabilities and summed cross-entropy of a causal LM, without full logits.

Shared by `distill train` (the SFT loss) and `distill grpo` (policy and reference log-probs), so
both compute the same numbers with the same code.

A 32k-token sequence over Qwen's 152k vocabulary has 5 billion logits (20 GB in fp32): they are
never materialised. The decoder's final hidden states (B, T, H) are computed once; only the
positions that have a target are projected through the LM head, in chunks of `chunk_tokens`,
so peak memory is one chunk's logits, whatever T is:
- per-token log-probs (`token_logprobs`, any downstream use, e.g. GRPO ratios): each chunk is
  wrapped in activation checkpointing, its logits freed after the forward and recomputed in the
  backward;
- the summed loss (`summed_nll`, SFT): liger-kernel's fused linear cross-entropy on CUDA when
  installed, else `LinearCrossEntropy`, the same method in torch (gradients computed chunk by
  chunk in the forward, no recomputation).

- the summed loss with logit distillation (`summed_nll_kd`, `distill train kd_alpha>0`): the
  cross-entropy and the forward KL to the teacher's top-k (`topk_forward_kl`) from the same
  chunk of logits, by `LinearCrossEntropyKD` (LinearCrossEntropy's method with the KD gradient
  added; liger has no KD kernel), or checkpointed chunks (`ce_kd_from_hidden`: a softcapped
  head, fused_loss=chunked, and scoring without gradients).

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
    cache (or an attention mask) transformers' sdpa and flex_attention do not read packed-sequence
    boundaries from position_ids, and packed sequences would attend to each other (sdpa_varlen
    and flash-attn split at the position restarts either way; students/attention.py)."""
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


def _rows_with_targets(hidden, targets):
    """(N, H) hidden states and (N,) targets of the positions that have a target, and where they are."""
    flat_targets = targets.reshape(-1)
    picked = (flat_targets != IGNORE).nonzero(as_tuple=True)[0]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked), flat_targets.index_select(0, picked), picked


def logprobs_from_hidden(hidden, head: nn.Module, targets, chunk_tokens: int = 1024, softcap=None):
    """(B, T) log p(targets) from hidden states (B, T, H); 0 where targets == IGNORE. Each chunk
    is checkpointed: its logits are freed after the forward and recomputed in the backward."""
    batch, length, _ = hidden.shape
    rows, wanted, picked = _rows_with_targets(hidden, targets)
    pieces = []
    for start in range(0, rows.shape[0], chunk_tokens):
        args = (rows[start : start + chunk_tokens], head.weight, head.bias, wanted[start : start + chunk_tokens], softcap)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    if pieces:
        values = torch.cat(pieces)
    else:  # nothing to score: still touch every parameter, so all ranks reduce the same gradients
        values = rows.new_zeros(0, dtype=torch.float32) + _touch_zero(hidden, head)
    out = values.new_zeros(batch * length).index_put((picked,), values)
    return out.view(batch, length)


def _touch_zero(hidden, head: nn.Module):
    """A float32 scalar zero whose graph reaches the decoder (through `hidden`) and the LM head."""
    return (hidden.sum() + head.weight.sum()).float() * 0


def _nll_and_grad(logits, targets):
    """Summed -log softmax(logits)[target] over rows, and its gradient with respect to the logits
    (softmax - onehot), computed in place over `logits` (n, V) fp32: the one copy of the
    cross-entropy arithmetic that LinearCrossEntropy and LinearCrossEntropyKD share."""
    normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    nll = (normaliser[:, 0] - logits.gather(-1, targets[:, None])[:, 0]).sum()
    grad = logits.sub_(normaliser).exp_()  # softmax, in place: d(-log p)/d logits = p - onehot
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    return nll, grad


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of -log softmax(hidden @ weight.T + bias)[target], whose gradients are
    computed chunk by chunk during the forward: one chunk's logits exist at a time and are never
    recomputed (three vocabulary matmuls per token instead of four with checkpointing). The
    method of liger-kernel's fused linear cross-entropy, in plain torch, for CPUs and for GPUs
    without liger. Call it only for a loss that is backpropagated once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int):
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,)
        weight_c = weight.to(hidden.dtype)
        bias_c = bias.to(hidden.dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start : start + chunk_tokens]
            wanted = targets[start : start + chunk_tokens]
            logits = F.linear(rows, weight_c, bias_c).float()  # (n, V)
            nll, grad = _nll_and_grad(logits, wanted)
            total += nll
            grad = grad.to(hidden.dtype)
            grad_hidden[start : start + chunk_tokens] = grad @ weight_c
            grad_weight += (grad.t() @ rows).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_bias_out = (grad_bias * grad_output).to(ctx.weight_dtype) if ctx.has_bias else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype), grad_bias_out, None, None


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
    """Sum over trained positions of -log p(target): a scalar. `fused`: "auto" (liger-kernel on
    CUDA when installed, else LinearCrossEntropy), "liger" (required), "chunked" (checkpointed
    chunks, as token_logprobs)."""
    hidden = final_hidden_states(model, input_ids, position_ids, attention_mask)
    head, softcap = _head(model)
    if fused == "liger" and not hidden.is_cuda:
        raise MissingDependency("liger-kernel", "gpu", "fused_loss=liger (a CUDA device and liger-kernel)")
    if fused != "chunked" and not softcap and torch.is_grad_enabled():
        rows, wanted, _ = _rows_with_targets(hidden, targets)
        if rows.shape[0] == 0:
            # An empty micro-batch (plan_step pads ranks that have fewer, so FSDP's collectives
            # match): no fused kernel sees zero rows (liger's divides by the row count). A zero
            # that touches the decoder and the head still sends every rank the same gradients.
            return _touch_zero(hidden, head)
        liger = _liger(required=fused == "liger") if hidden.is_cuda else None
        if liger is not None:
            # One dtype for the kernel: under autocast the hidden states are bf16, the weight fp32.
            weight = head.weight.to(rows.dtype)
            bias = head.bias.to(rows.dtype) if head.bias is not None else None
            return liger(rows, weight, wanted, bias=bias, ignore_index=IGNORE, reduction="sum")
        return LinearCrossEntropy.apply(rows, head.weight, head.bias, wanted, chunk_tokens)
    return -logprobs_from_hidden(hidden, head, targets, chunk_tokens, softcap).sum()


def topk_forward_kl(student_logprobs, teacher_logprobs, temperature: float = 1.0):
    """Sum over rows of T^2 * sum_k p_t,k (log p_t,k - log p_s,k): the forward KL from the teacher's
    top-k to the student, a scalar.

    student_logprobs (M, K): the student's log-softmax over its FULL vocabulary at temperature T,
    at the teacher's top-k ids. teacher_logprobs (M, K): the teacher's log-probs (temperature 1)
    of those ids; -inf marks padding. The teacher side is renormalised over its top-k at T:
    p_t = softmax(teacher_logprobs / T) over k, exactly the teacher's tempered distribution
    restricted to its top-k (log-probs differ from logits by a constant per row). The tail the
    top-k do not cover gets no teacher mass; the student's is not renormalised, so the term is
    >= -log(sum_k p_s,k) >= 0 and is zero only when the student puts p_t on the top-k and nothing
    elsewhere: mass the student leaves in the tail is penalised (DistillKit's `missing=zero`).
    T^2 keeps the gradient's size comparable across temperatures (Hinton et al. 2015)."""
    dtype = torch.promote_types(student_logprobs.dtype, torch.float32)  # fp16 storage and bf16 compute are widened
    teacher = torch.log_softmax(teacher_logprobs.to(dtype) / temperature, dim=-1)  # (M, K)
    weight = teacher.exp()
    teacher = teacher.masked_fill(weight == 0, 0.0)  # padded entries: 0 * (0 - s), no -inf * 0
    return (weight * (teacher - student_logprobs)).sum() * temperature**2


def _chunk_ce_kd(hidden, weight, bias, targets, slots, kd_ids, kd_logprobs, temperature: float, softcap):
    # hidden (n, H), targets (n,), slots (n,): row of kd_ids / kd_logprobs (M, K) or -1 -> (2,) [CE sum, KD sum]
    logits = F.linear(hidden, weight, bias).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ce = (torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
    rows = (slots >= 0).nonzero(as_tuple=True)[0]
    index = slots.index_select(0, rows)
    scaled = logits.index_select(0, rows) / temperature  # (m, V)
    student = scaled.gather(-1, kd_ids.index_select(0, index)) - torch.logsumexp(scaled, dim=-1, keepdim=True)  # (m, K)
    return torch.stack([ce, topk_forward_kl(student, kd_logprobs.index_select(0, index), temperature)])


def ce_kd_from_hidden(hidden, head: nn.Module, targets, kd, temperature: float = 1.0, chunk_tokens: int = 1024, softcap=None):
    """(2,) [sum of -log p(target), sum of the top-k forward KL] over a micro-batch, from hidden
    states (B, T, H); `kd` (students/data.py KDBatch) holds the teacher's top-k at flat positions
    that all have a target. Chunked and checkpointed: one chunk's (n, V) logits at a time."""
    rows, wanted, picked = _rows_with_targets(hidden, targets)
    slots = _kd_slots(targets, picked, kd)
    ids, logprobs = kd.ids, kd.logprobs.float()
    pieces = []
    for start in range(0, rows.shape[0], chunk_tokens):
        end = start + chunk_tokens
        args = (rows[start:end], head.weight, head.bias, wanted[start:end], slots[start:end], ids, logprobs, temperature, softcap)
        pieces.append(checkpoint(_chunk_ce_kd, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_ce_kd(*args))
    if not pieces:
        return _touch_zero(hidden, head).expand(2)
    return torch.stack(pieces).sum(0)


def _kd_slots(targets, picked, kd):
    """(N,) for each position with a target (`picked`): its row in the KDBatch, or -1."""
    slots = torch.full((targets.numel(),), -1, dtype=torch.long, device=targets.device)
    slots[kd.positions] = torch.arange(len(kd.positions), device=targets.device)
    slots = slots.index_select(0, picked)
    if int((slots >= 0).sum()) != len(kd.positions):
        raise ValueError("a position with the teacher's top-k has no target: the alignment of the top-k to the sequence is wrong")
    return slots


class LinearCrossEntropyKD(torch.autograd.Function):
    """weight_ce * sum CE + weight_kd * sum KD over rows (KD: `topk_forward_kl` at the rows whose
    slot is >= 0), with LinearCrossEntropy's method: one chunk's logits at a time, gradients
    computed in the forward, never recomputed. d KD / d logits = T * (softmax(z / T) - p_t), p_t
    the renormalised teacher top-k scattered over the vocabulary (0 elsewhere). Returns (loss,
    CE sum, KD sum); the sums are for logging and carry no gradient. Backpropagate once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, slots, kd_ids, kd_logprobs, temperature: float, weight_ce: float, weight_kd: float, chunk_tokens: int):
        # hidden (N, H), weight (V, H), targets (N,), slots (N,), kd_ids / kd_logprobs (M, K)
        weight_c = weight.to(hidden.dtype)
        bias_c = bias.to(hidden.dtype) if bias is not None else None
        teacher = torch.log_softmax(kd_logprobs.float() / temperature, dim=-1)  # (M, K) the top-k renormalised at T
        p_teacher = teacher.exp()
        teacher = teacher.masked_fill(p_teacher == 0, 0.0)
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = hidden[start : start + chunk_tokens]
            wanted = targets[start : start + chunk_tokens]
            slot = slots[start : start + chunk_tokens]
            logits = F.linear(rows, weight_c, bias_c).float()  # (n, V)
            has = (slot >= 0).nonzero(as_tuple=True)[0]
            kd_grad = None
            if len(has):
                index = slot.index_select(0, has)
                ids, p, log_p = kd_ids.index_select(0, index), p_teacher.index_select(0, index), teacher.index_select(0, index)
                scaled = logits.index_select(0, has).div_(temperature)  # (m, V), a copy
                student = scaled.log_softmax(dim=-1)  # (m, V)
                kd_total += (p * (log_p - student.gather(-1, ids))).sum() * temperature**2
                kd_grad = student.exp_().scatter_add_(-1, ids, -p).mul_(weight_kd * temperature)  # T * (q - p_t), weighted
            nll, grad = _nll_and_grad(logits, wanted)  # after the KD term has read the logits: this overwrites them
            ce_total += nll
            grad.mul_(weight_ce)
            if kd_grad is not None:
                grad.index_add_(0, has, kd_grad)
            grad = grad.to(hidden.dtype)
            grad_hidden[start : start + chunk_tokens] = grad @ weight_c
            grad_weight += (grad.t() @ rows).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ce_sum, kd_sum = ce_total.clone(), kd_total.clone()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return ce_total * weight_ce + kd_total * weight_kd, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_output, _ce, _kd):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_bias_out = (grad_bias * grad_output).to(ctx.weight_dtype) if ctx.has_bias else None
        return (grad_hidden * grad_output.to(grad_hidden.dtype), (grad_weight * grad_output).to(ctx.weight_dtype), grad_bias_out,
                None, None, None, None, None, None, None, None)  # fmt: skip


def summed_nll_kd(model: nn.Module, input_ids, position_ids, targets, kd, weights: tuple[float, float] = (1.0, 1.0), attention_mask=None,
                  chunk_tokens: int = 1024, temperature: float = 1.0, fused: str = "auto"):  # fmt: skip
    """(loss, NLL sum, KD sum) of a micro-batch, loss = weights[0] * NLL sum + weights[1] * KD sum
    (the sums detached). `fused` "auto"/"liger": LinearCrossEntropyKD (no liger kernel has the KD
    term); "chunked", a softcapped head, or no gradient: ce_kd_from_hidden's checkpointed chunks."""
    hidden = final_hidden_states(model, input_ids, position_ids, attention_mask)
    head, softcap = _head(model)
    if fused != "chunked" and not softcap and torch.is_grad_enabled():
        rows, wanted, picked = _rows_with_targets(hidden, targets)
        if rows.shape[0]:
            slots = _kd_slots(targets, picked, kd)
            return LinearCrossEntropyKD.apply(rows, head.weight, head.bias, wanted, slots, kd.ids, kd.logprobs, temperature, weights[0], weights[1], chunk_tokens)
    sums = ce_kd_from_hidden(hidden, head, targets, kd, temperature, chunk_tokens, softcap)
    return sums[0] * weights[0] + sums[1] * weights[1], sums[0].detach(), sums[1].detach()


def _liger(required: bool):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        if required:
            raise MissingDependency("liger-kernel", "gpu", "fused_loss=liger") from None
        return None
    return liger_fused_linear_cross_entropy


class Scorer(nn.Module):
    """A causal LM as a module returning per-token log-probs (reduction="none", (B, T)), the
    summed NLL (reduction="sum", scalar), or with the teacher's top-k (`kd`, reduction="sum")
    (kd_weights[0] * NLL + kd_weights[1] * KD, NLL, KD). The root module for FSDP2 sharding."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024, fused: str = "auto"):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.fused = fused

    def forward(self, input_ids, position_ids=None, targets=None, attention_mask=None, reduction: str = "none", kd=None, kd_temperature: float = 1.0,
                kd_weights: tuple[float, float] = (1.0, 1.0)):  # fmt: skip
        if reduction == "sum" and kd is not None:  # logit distillation: (weighted loss, NLL sum, top-k KL sum)
            return summed_nll_kd(self.model, input_ids, position_ids, targets, kd, kd_weights, attention_mask, self.chunk_tokens, kd_temperature, self.fused)
        if reduction == "sum":
            return summed_nll(self.model, input_ids, position_ids, targets, attention_mask, self.chunk_tokens, self.fused)
        return token_logprobs(self.model, input_ids, position_ids, targets, attention_mask, self.chunk_tokens)

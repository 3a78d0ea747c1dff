"""The arithmetic of group-relative policy optimisation, as pure functions of tensors.

Everything `distill grpo` computes between "rewards are known" and "loss.backward()" lives here,
so each variant's objective can be checked against a hand-computed example
(tests/test_rl.py) without a model. Three variants, each named as in its paper:

    grpo     DeepSeekMath (Shao et al. 2024), as used for DeepSeek-R1-Zero:
             A_i = (r_i - mean(r)) / std(r) over the G completions of a prompt;
             loss = 1/N sum_i 1/|o_i| sum_t l_{i,t}   (each sequence's token mean, then the mean
             over sequences: a long completion's tokens each weigh less than a short one's).
    dr_grpo  "Understanding R1-Zero-Like Training" (Liu et al. 2025): the same, without the two
             biases they identify: no division by std(r) (it up-weights prompts that are too easy
             or too hard) and no division by |o_i| (it makes long wrong answers cheap): the
             token sum is divided by a constant, N * max_tokens.
    dapo     DAPO (Yu et al. 2025): std-normalised advantages as in grpo; clip-higher (separate
             eps_low=0.2, eps_high=0.28); token-level averaging over the whole optimisation batch
             (sum over all tokens / number of tokens); dynamic sampling (drop groups whose rewards
             are all equal; they carry no signal); soft overlong punishment (see
             distill.rewards.soft_overlong_penalty) or overlong filtering (truncated completions
             masked out of the loss).

Shared by all three (the PPO-style surrogate of GRPO):
    ratio_{i,t} = exp(logp_{i,t} - logp_old_{i,t})
    l_{i,t}     = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
                  + beta * k3_{i,t},   k3 = exp(ref - logp) - (ref - logp) - 1  (Schulman's k3,
                  an unbiased, always non-negative estimate of KL(pi || pi_ref); DeepSeekMath eq. 4)
The KL term is aggregated with the same weights as the surrogate (as TRL and verl do).

On-policy distillation (distill onpolicy) uses the same surrogate with a per-token advantage,
`reverse_kl_advantages`: A_{i,t} = -(log pi(o_{i,t}) - log pi_teacher(o_{i,t})), optionally plus a
weighted group-relative reward advantage.

`PolicyScorer` is distill train's Scorer (the LM head applied in chunks, never the full logits;
the FSDP root module) returning what the loss needs: log-probs at the sampling temperature and,
for the logs, the entropy of the policy at the same positions.

Micro-batching is exact: `sequence_weights` is computed once for a whole optimisation batch (all
the micro-batches whose gradients are accumulated into one optimizer step) and each token's loss
is multiplied by its sequence's weight, so accumulating micro-batch gradients gives the same
gradient as one big batch, for every variant. (Averaging per micro-batch and then over
micro-batches, as several libraries did, silently changes token-level averaging into something
else.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from distill.students.logprobs import IGNORE, Scorer, causal_lm, final_hidden_states, logprobs_from_hidden

Variant = Literal["grpo", "dr_grpo", "dapo"]
Aggregation = Literal["sequence", "token", "constant"]
Overlong = Literal["none", "mask", "penalty"]


@dataclass(frozen=True)
class Algorithm:
    """The concrete knobs a variant stands for; `resolve` fills in the ones a config leaves unset."""

    variant: Variant
    scale_advantages: bool  # divide by the group's std
    aggregation: Aggregation  # how token losses are averaged into the batch loss
    epsilon_low: float
    epsilon_high: float
    dynamic_sampling: bool  # drop groups whose rewards are all equal
    overlong: Overlong  # truncated completions: kept ("none"), masked out of the loss, or penalised by length


# Each variant as its paper describes it. beta (the KL weight) is not part of a variant: it is 0
# by default for all three (recent practice: DAPO and Dr. GRPO drop the KL term; DeepSeekMath
# used 0.04 and DeepSeek-R1-Zero 0.001).
VARIANTS: dict[str, Algorithm] = {
    "grpo": Algorithm("grpo", True, "sequence", 0.2, 0.2, False, "none"),
    "dr_grpo": Algorithm("dr_grpo", False, "constant", 0.2, 0.2, False, "none"),
    "dapo": Algorithm("dapo", True, "token", 0.2, 0.28, True, "penalty"),
}


def resolve(
    variant: str,
    *,
    scale_advantages: bool | None = None,
    aggregation: str | None = None,
    epsilon_low: float | None = None,
    epsilon_high: float | None = None,
    dynamic_sampling: bool | None = None,
    overlong: str | None = None,
) -> Algorithm:
    """The variant's algorithm, with each knob that is not None replacing the variant's choice."""
    if variant not in VARIANTS:
        raise ValueError(f"variant '{variant}' is not one of {', '.join(VARIANTS)}")
    base = VARIANTS[variant]
    given = dict(
        scale_advantages=scale_advantages,
        aggregation=aggregation,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        dynamic_sampling=dynamic_sampling,
        overlong=overlong,
    )
    fields = {name: getattr(base, name) if value is None else value for name, value in given.items()}
    return Algorithm(variant=base.variant, **fields)


# --------------------------------------------------------------------------------------------
# advantages


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor | None = None, *, scale: bool, epsilon: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages. rewards (P, G): G completions for each of P prompts.

    valid (P, G) bool marks completions whose reward is known; the others (a verifier timeout)
    take no part in their group's mean and std and get advantage 0. The std is the unbiased
    sample std (Bessel's correction, as torch.std, TRL and verl compute it); a group with one
    valid member has std 0. `epsilon` keeps an all-equal group (std 0) finite: its advantages are
    0 / (0 + epsilon) = 0. Returns (P, G).
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    weight = valid.to(rewards.dtype)  # (P, G)
    count = weight.sum(dim=1, keepdim=True)  # (P, 1)
    mean = (rewards * weight).sum(dim=1, keepdim=True) / count.clamp(min=1)  # (P, 1)
    centred = (rewards - mean) * weight  # (P, G), 0 where not valid
    if not scale:
        return centred
    variance = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)  # (P, 1)
    return centred / (variance.sqrt() + epsilon)


def informative_groups(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DAPO's dynamic-sampling test: (P,) bool, True for groups whose valid rewards are not all equal.

    A group whose completions all score the same (all right or all wrong) has zero advantage
    everywhere, so it adds no gradient; DAPO drops it and samples more prompts instead.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    high = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf)).amax(dim=1)  # (P,)
    low = torch.where(valid, rewards, torch.full_like(rewards, torch.inf)).amin(dim=1)  # (P,)
    return (valid.sum(dim=1) >= 2) & (high > low)


def reverse_kl_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    coef: float = 1.0,
    discount: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """On-policy distillation's per-token advantages (Thinking Machines, tinker-cookbook
    `incorporate_kl_penalty`): A_t = -coef * (log p_student(x_t) - log p_teacher(x_t)), the
    negative of a one-sample estimate of the reverse KL at position t (x_t was sampled from the
    student). discount = gamma > 0 gives each token the discounted sum of the KL still to come,
    A_t = sum_{s >= t} gamma^(s - t) a_s (the cookbook's kl_discount_factor; 0, its default: no
    sum, each token answers for itself).

    student_logprobs, teacher_logprobs, mask: (B, T); the student's are the sampling policy's
    (detached). Returns (advantages (B, T), 0 where mask is 0; reverse KL (B, T) = log p_s - log
    p_t on the mask).
    """
    mask = mask.to(torch.float64)
    reverse_kl = (student_logprobs.detach().double() - teacher_logprobs.detach().double()) * mask  # (B, T)
    advantages = -coef * reverse_kl  # (B, T)
    if discount > 0:
        summed = torch.zeros_like(advantages)
        running = torch.zeros(advantages.shape[0], dtype=advantages.dtype, device=advantages.device)  # (B,)
        for t in range(advantages.shape[1] - 1, -1, -1):  # right to left: A_t = a_t + gamma * A_{t+1}
            running = advantages[:, t] + discount * running
            summed[:, t] = running
        advantages = summed * mask
    return advantages.to(torch.float32), reverse_kl.to(torch.float32)


# --------------------------------------------------------------------------------------------
# loss


def sequence_weights(
    token_counts: torch.Tensor,
    aggregation: str,
    *,
    max_tokens: int,
    totals: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """The weight of each loss token of sequence i in the loss of one optimisation batch.

    token_counts (N,): the number of loss tokens of each of the N sequences (0 for a sequence
    masked out, e.g. an overlong one under DAPO's overlong filtering). `totals` = (sequences,
    sequences with a loss token, loss tokens) of the whole optimisation batch when these N are
    only part of it (one rank's share under data parallelism); default: these N are all of it.
    Returns (N,) such that loss = sum_i weight_i * sum_t l_{i,t}:
        sequence  1 / (|o_i| * N')      N' = sequences with at least one loss token (grpo)
        token     1 / sum_i |o_i|        (dapo)
        constant  1 / (N * max_tokens)   (dr_grpo; N counts every sequence of the batch)
    """
    counts = token_counts.to(torch.float64)
    if totals is None:
        totals = (float(len(counts)), float((counts > 0).sum()), float(counts.sum()))
    sequences, trained, tokens = totals
    if aggregation == "sequence":
        weights = torch.where(counts > 0, 1.0 / (counts.clamp(min=1) * max(trained, 1.0)), torch.zeros_like(counts))
    elif aggregation == "token":
        weights = torch.full_like(counts, 1.0 / max(tokens, 1.0))
    elif aggregation == "constant":
        assert max_tokens > 0, "the constant normaliser of dr_grpo needs max_tokens > 0"
        weights = torch.full_like(counts, 1.0 / (max(sequences, 1.0) * max_tokens))
    else:
        raise ValueError(f"aggregation '{aggregation}' is not one of sequence, token, constant")
    return weights.to(torch.float32)


@dataclass
class LossStats:
    """Token-level figures of one micro-batch, as sums over its loss tokens (divide by `tokens`)."""

    tokens: float
    clipped: float  # tokens whose ratio was clipped (the clip was active on the gradient)
    clipped_low: float  # ... below 1 - eps_low with A < 0
    clipped_high: float  # ... above 1 + eps_high with A > 0
    kl: float  # sum of k3 (0 when no reference)
    ratio: float  # sum of ratios


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """This micro-batch's share of the optimisation batch's loss, and its token statistics.

    logprobs (B, T): log pi_theta of each completion token (with grad); old_logprobs (B, T): the
    same under the policy that sampled them (no grad); advantages (B,) one per sequence (GRPO) or
    (B, T) one per token (on-policy distillation's reverse KL); mask (B, T): 1 on loss tokens;
    weights (B,): from `sequence_weights`; ref_logprobs (B, T) when beta > 0.
    """
    assert logprobs.shape == old_logprobs.shape == mask.shape, "logprobs, old_logprobs and mask must share a shape (B, T)"
    assert advantages.dim() == 1 or advantages.shape == mask.shape, "advantages are (B,) per sequence or (B, T) per token"
    mask = mask.to(logprobs.dtype)
    advantage = advantages.to(logprobs.dtype)
    advantage = advantage.unsqueeze(1) if advantage.dim() == 1 else advantage.detach()  # (B, 1) or (B, T)
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.min(ratio * advantage, clipped_ratio * advantage)  # (B, T)
    kl = torch.zeros_like(per_token)
    if beta != 0.0:
        assert ref_logprobs is not None, "beta > 0 needs the reference policy's log-probs"
        delta = ref_logprobs.detach() - logprobs  # (B, T)
        kl = torch.exp(delta) - delta - 1.0  # k3 >= 0
        per_token = per_token + beta * kl
    loss = (per_token * mask * weights.to(logprobs.dtype).unsqueeze(1)).sum()

    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantage < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantage > 0)
        stats = LossStats(
            tokens=float(mask.sum()),
            clipped=float(((low | high) * mask).sum()),
            clipped_low=float((low * mask).sum()),
            clipped_high=float((high * mask).sum()),
            kl=float((kl * mask).sum()),
            ratio=float((ratio * mask).sum()),
        )
    return loss, stats


# --------------------------------------------------------------------------------------------
# log-probs of the policy


class PolicyScorer(Scorer):
    """A causal LM returning (log p(targets) at `temperature`, entropy or None), both (B, T) and 0
    where targets == IGNORE. Only positions with a target go through the LM head."""

    def forward(self, input_ids, attention_mask, targets, temperature: float = 1.0, with_entropy: bool = False):
        lm = causal_lm(self.model)
        head = lm.get_output_embeddings()
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        hidden = final_hidden_states(self.model, input_ids, None, attention_mask)  # (B, T, H)
        if temperature != 1.0:
            # logits / T == head(hidden / T) for a head without bias; a soft-capped head applies
            # T after the cap, which this shortcut cannot express
            if softcap or head.bias is not None:
                from distill.errors import ConfigError

                raise ConfigError("temperature != 1 needs an LM head without bias or logit soft-capping; use temperature=1.0")
            hidden = hidden / temperature
        logprobs = logprobs_from_hidden(hidden, head, targets, self.chunk_tokens, softcap)  # (B, T)
        entropy = token_entropy(hidden.detach(), head, targets, self.chunk_tokens, softcap) if with_entropy else None
        # clones, not views: FSDP2 hooks the backward of a root's outputs, and a view would lose it
        return logprobs.clone(), entropy


def token_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_tokens: int = 1024, softcap=None) -> torch.Tensor:
    """(B, T) entropy of softmax(head(hidden)) where targets != IGNORE (0 elsewhere), computed
    in chunks of positions without gradients. hidden (B, T, H), targets (B, T)."""
    with torch.no_grad():
        batch, length, width = hidden.shape
        picked = (targets.reshape(-1) != IGNORE).nonzero(as_tuple=True)[0]
        rows = hidden.reshape(-1, width).index_select(0, picked)  # (N, H)
        pieces = []
        for start in range(0, rows.shape[0], chunk_tokens):
            logits = torch.nn.functional.linear(rows[start : start + chunk_tokens], head.weight, head.bias).float()  # (n, V)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logp = torch.log_softmax(logits, dim=-1)
            pieces.append(-(logp.exp() * logp).sum(-1))
        values = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
        return values.new_zeros(batch * length).index_put((picked,), values).reshape(batch, length).clone()

"""Each GRPO variant's advantages and loss against examples worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distill.students.rl import (
    VARIANTS,
    group_advantages,
    informative_groups,
    policy_loss,
    resolve,
    sequence_weights,
)

EPS = 1e-4  # group_advantages' default epsilon


def test_grpo_advantages_are_mean_centred_and_divided_by_the_unbiased_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    advantages = group_advantages(rewards, scale=True)
    # group 1: mean 0.5; unbiased variance (4 * 0.25) / 3 = 1/3
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert torch.allclose(advantages[0], torch.tensor([a, -a, -a, a]))
    # group 2: all equal -> every advantage is exactly 0 (no signal), not NaN
    assert torch.equal(advantages[1], torch.zeros(4))


def test_dr_grpo_advantages_are_only_mean_centred():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
    advantages = group_advantages(rewards, scale=False)
    assert torch.allclose(advantages, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.5, -0.5, -0.5, -0.5]]))


def test_completions_with_unknown_reward_take_no_part_in_their_group():
    rewards = torch.tensor([[1.0, 0.0, 123.0, 0.0]])  # the 123 is a verifier timeout: unknown
    valid = torch.tensor([[True, True, False, True]])
    advantages = group_advantages(rewards, valid, scale=True)
    # mean of (1, 0, 0) = 1/3; centred (2/3, -1/3, -1/3); unbiased variance (4/9 + 1/9 + 1/9) / 2 = 1/3
    std = math.sqrt(1 / 3) + EPS
    assert torch.allclose(advantages, torch.tensor([[2 / 3 / std, -1 / 3 / std, 0.0, -1 / 3 / std]]))


def test_dynamic_sampling_keeps_only_groups_with_different_rewards():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [True, False, False]])
    # the last group's only differing member is not valid, and one valid member is no comparison
    assert informative_groups(rewards, valid).tolist() == [False, True, False, False]


def _two_sequences():
    """Sequence 1 has 2 loss tokens, sequence 2 has 3 (T = 3)."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return mask, mask.sum(dim=1)


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        # l_{i,t} = -A_i when the ratio is 1. grpo: mean over each sequence, then over sequences
        ("sequence", lambda a1, a2: -(a1 * 2 / 2 + a2 * 3 / 3) / 2),
        # dapo: all 5 tokens of the batch weigh the same
        ("token", lambda a1, a2: -(2 * a1 + 3 * a2) / 5),
        # dr_grpo: token sum over N * max_tokens = 2 * 4
        ("constant", lambda a1, a2: -(2 * a1 + 3 * a2) / 8),
    ],
)
def test_aggregation_of_token_losses(aggregation, expected):
    mask, counts = _two_sequences()
    advantages = torch.tensor([0.7, -0.3])
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    weights = sequence_weights(counts, aggregation, max_tokens=4)
    loss, stats = policy_loss(logprobs, logprobs.detach(), advantages, mask, weights, epsilon_low=0.2, epsilon_high=0.2)
    assert loss.item() == pytest.approx(expected(0.7, -0.3), abs=1e-6)
    assert stats.tokens == 5 and stats.clipped == 0 and stats.ratio == pytest.approx(5.0)
    # the gradient of a loss token is -A_i * ratio * weight_i; padding gets none
    loss.backward()
    assert logprobs.grad[0, 2] == 0
    assert logprobs.grad[1, 0].item() == pytest.approx(0.3 * weights[1].item())


def test_sequence_weights_skip_masked_sequences_for_grpo_but_not_for_dr_grpo():
    counts = torch.tensor([2.0, 0.0, 4.0])  # the middle one was masked out (overlong filtering)
    assert sequence_weights(counts, "sequence", max_tokens=8).tolist() == pytest.approx([1 / 4, 0.0, 1 / 8])
    assert sequence_weights(counts, "token", max_tokens=8).tolist() == pytest.approx([1 / 6] * 3)
    assert sequence_weights(counts, "constant", max_tokens=8).tolist() == pytest.approx([1 / 24] * 3)


def test_weights_of_one_rank_use_the_totals_of_the_whole_batch():
    counts = torch.tensor([2.0, 0.0, 4.0, 3.0, 1.0])
    for aggregation in ("sequence", "token", "constant"):
        whole = sequence_weights(counts, aggregation, max_tokens=8)
        totals = (5.0, 4.0, 10.0)  # sequences, sequences with a loss token, loss tokens
        rank0 = sequence_weights(counts[:2], aggregation, max_tokens=8, totals=totals)
        rank1 = sequence_weights(counts[2:], aggregation, max_tokens=8, totals=totals)
        assert torch.allclose(torch.cat([rank0, rank1]), whole), aggregation


def test_clipping_with_separate_low_and_high_epsilons():
    # one sequence per case, one token each; old log-prob 0, so ratio = exp(logprob)
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5])
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    logprobs = ratios.log().unsqueeze(1).clone().requires_grad_(True)  # (4, 1)
    old = torch.zeros(4, 1)
    mask = torch.ones(4, 1)
    weights = torch.ones(4)  # plain sum, to read each token's loss
    for epsilon_high, high_clip in [(0.2, 1.2), (0.28, 1.28)]:  # grpo, then dapo's clip-higher
        logprobs.grad = None
        loss, stats = policy_loss(logprobs, old, advantages, mask, weights, epsilon_low=0.2, epsilon_high=epsilon_high)
        # token 1: A>0, ratio above 1+eps_high -> clipped: -high_clip * 1
        # token 2: A<0, ratio 1.5 -> min(1.5*-1, high_clip*-1) = -1.5 -> loss 1.5, not clipped
        # token 3: A<0, ratio below 1-eps_low -> min(0.5*-1, 0.8*-1) = -0.8 -> loss 0.8, clipped
        # token 4: A>0, ratio 0.5 -> min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped
        assert loss.item() == pytest.approx(-high_clip + 1.5 + 0.8 - 0.5)
        assert (stats.clipped, stats.clipped_high, stats.clipped_low) == (2, 1, 1)
        loss.backward()
        # clipped tokens pass no gradient; the others pass -A * ratio
        assert logprobs.grad.squeeze(1).tolist() == pytest.approx([0.0, 1.5, 0.0, -0.5])


def test_k3_kl_penalty_to_the_reference():
    logprobs = torch.tensor([[math.log(0.25), math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])
    mask = torch.ones(1, 2)
    weights = sequence_weights(mask.sum(1), "sequence", max_tokens=2)  # 1/2 per token
    loss, stats = policy_loss(
        logprobs, logprobs.detach(), torch.tensor([0.0]), mask, weights,
        epsilon_low=0.2, epsilon_high=0.2, beta=0.1, ref_logprobs=ref,
    )
    # token 1: d = ref - logp = log 2 -> k3 = 2 - log 2 - 1; token 2: d = 0 -> 0
    k3 = 2 - math.log(2) - 1
    assert stats.kl == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3 / 2)
    loss.backward()
    # d k3 / d logp = 1 - exp(d) = -1 for token 1, 0 for token 2
    assert logprobs.grad.tolist()[0] == pytest.approx([0.1 * -1 / 2, 0.0])


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    torch.manual_seed(0)
    mask = (torch.rand(6, 7) > 0.3).float()
    advantages = torch.randn(6)
    old = -torch.rand(6, 7)
    logprobs = (old + 0.3 * torch.randn(6, 7)).requires_grad_(True)
    for aggregation in ("sequence", "token", "constant"):
        weights = sequence_weights(mask.sum(1), aggregation, max_tokens=7)
        kwargs = dict(epsilon_low=0.2, epsilon_high=0.28)
        logprobs.grad = None
        policy_loss(logprobs, old, advantages, mask, weights, **kwargs)[0].backward()
        full = logprobs.grad.clone()
        logprobs.grad = None
        for part in (slice(0, 2), slice(2, 5), slice(5, 6)):
            policy_loss(logprobs[part], old[part], advantages[part], mask[part], weights[part], **kwargs)[0].backward()
        assert torch.allclose(logprobs.grad, full, atol=1e-7), aggregation


def test_variants_and_overrides():
    assert resolve("dapo") == VARIANTS["dapo"]
    assert (VARIANTS["dapo"].epsilon_low, VARIANTS["dapo"].epsilon_high) == (0.2, 0.28)
    assert not VARIANTS["dr_grpo"].scale_advantages and VARIANTS["dr_grpo"].aggregation == "constant"
    mixed = resolve("grpo", aggregation="token", dynamic_sampling=True)
    assert mixed.aggregation == "token" and mixed.dynamic_sampling and mixed.scale_advantages
    with pytest.raises(ValueError, match="not one of"):
        resolve("ppo")

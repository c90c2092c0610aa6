"""Tests for align.advantages: hand-computed values, masking, group layout, TRL's GRPO formula."""

from __future__ import annotations

import math

import pytest
import torch

from align.advantages import (
    compute_advantages,
    compute_gae,
    grpo_advantages,
    kl_penalty,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_level_rewards,
    whiten,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# ------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------

def test_kl_estimators_hand_values():
    # policy p = 0.5, reference q = 0.25 on the first token (d = ln 2), swapped on the second
    # (d = -ln 2); the third token is masked (both log-probs 0).
    logprobs = t([[math.log(0.5), math.log(0.25), 0.0]])
    ref = t([[math.log(0.25), math.log(0.5), 0.0]])
    ln2 = math.log(2)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), t([[ln2, -ln2, 0.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"),
                               t([[ln2**2 / 2, ln2**2 / 2, 0.0]]))
    # k3 = q/p - ln(q/p) - 1: q/p = 1/2 then 2
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"),
                               t([[0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1, 0.0]]))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logprobs, ref, "k4")


def test_kl_k3_gradient_flows_to_policy():
    logprobs = t([[math.log(0.5)]]).requires_grad_()
    kl_penalty(logprobs, t([[math.log(0.25)]]), "k3").sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = -q/p + 1 = 1 - 0.5
    assert logprobs.grad.item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# Whitening
# ------------------------------------------------------------------------------------------------

def test_whiten_over_valid_positions_only():
    x = t([[1.0, 2.0, 3.0], [4.0, 99.0, -99.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # valid values 1..4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    unbiased_std, population_std = math.sqrt(5 / 3), math.sqrt(5 / 4)
    expected = [[(1 - 2.5) / unbiased_std, (2 - 2.5) / unbiased_std, (3 - 2.5) / unbiased_std],
                [(4 - 2.5) / unbiased_std, 0.0, 0.0]]
    torch.testing.assert_close(whiten(x, mask), t(expected))
    torch.testing.assert_close(whiten(x, mask, unbiased=False)[0, 0],
                               t((1 - 2.5) / population_std))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False)[1],
                               t([(4 - 2.5) / unbiased_std + 2.5, 0.0, 0.0]))
    assert torch.equal(whiten(x, torch.zeros_like(mask)), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------
# Token-level rewards
# ------------------------------------------------------------------------------------------------

def test_token_level_rewards_score_on_last_valid_token_minus_kl():
    scores = t([1.0, 2.0, 3.0])
    mask = t([[1, 1, 0], [0, 1, 1], [0, 0, 0]])  # right-padded, left-padded, empty
    kl = torch.full((3, 3), 0.5, dtype=F64)
    rewards = token_level_rewards(scores, mask, kl, kl_coef=0.1)
    expected = [[-0.05, 1 - 0.05, 0.0], [0.0, -0.05, 2 - 0.05], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, t(expected))
    torch.testing.assert_close(token_level_rewards(scores, mask),
                               t([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------

def test_gae_hand_values_with_padding_ignored():
    gamma, lam = 0.9, 0.8
    rewards = t([[0.0, 0.0, 1.0, 5.0]])  # the 5 and the 9 sit on padding
    values = t([[0.5, 0.6, 0.7, 9.0]])
    mask = t([[1, 1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    a2 = 1.0 + gamma * 0.0 - 0.7  # bootstrap 0 after the last valid token
    a1 = (0.0 + gamma * 0.7 - 0.6) + gamma * lam * a2
    a0 = (0.0 + gamma * 0.6 - 0.5) + gamma * lam * a1
    torch.testing.assert_close(advantages, t([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(returns, t([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]]))
    assert (a0, a1, a2) == (pytest.approx(0.21712), pytest.approx(0.246), pytest.approx(0.3))


def test_gae_skips_masked_holes_and_left_padding():
    gamma, lam = 0.9, 0.8
    rewards = t([[0.0, 7.0, 1.0], [3.0, 0.0, 1.0]])
    values = t([[0.5, 9.0, 0.7], [9.0, 0.5, 0.7]])
    mask = t([[1, 0, 1], [0, 1, 1]])  # a hole (e.g. tool output); a left-padded row
    advantages, _ = compute_gae(rewards, values, mask, gamma, lam)
    a2 = 1.0 - 0.7
    a0 = (0.0 + gamma * 0.7 - 0.5) + gamma * lam * a2  # token 0 links to token 2
    torch.testing.assert_close(advantages, t([[a0, 0.0, a2], [0.0, a0, a2]]))


def test_gae_with_gamma_lambda_one_is_return_minus_value():
    rewards = t([[0.1, 0.2, 1.0]])
    values = t([[0.3, 0.4, 0.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(returns, t([[1.3, 1.2, 1.0]]))
    torch.testing.assert_close(advantages, t([[1.3 - 0.3, 1.2 - 0.4, 1.0 - 0.5]]))


def test_gae_output_carries_no_gradient():
    values = t([[0.3, 0.4]]).requires_grad_()
    advantages, returns = compute_gae(t([[0.0, 1.0]]), values, torch.ones(1, 2), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# ------------------------------------------------------------------------------------------------
# Group estimators
# ------------------------------------------------------------------------------------------------

def test_grpo_hand_values():
    rewards = t([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.25; squared deviations 0.5625 + 3 * 0.0625 = 0.75; / (4 - 1) -> std 0.5
    # group 1: identical rewards -> 0 advantage (0 / (0 + eps))
    expected = [0.75 / (0.5 + 1e-4)] + [-0.25 / (0.5 + 1e-4)] * 3 + [0.0] * 4
    torch.testing.assert_close(grpo_advantages(rewards, 4), t(expected))
    torch.testing.assert_close(grpo_advantages(rewards, 4, scale_by_std=False),
                               t([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(grpo_advantages(rewards, 1), torch.zeros(8, dtype=F64))


def test_grpo_matches_trl_formula():
    """TRL computes GRPO advantages inline in GRPOTrainer._generate_and_score_completions; this
    replays those lines (scale_rewards="group") with TRL's own nanstd."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    gen = torch.Generator().manual_seed(0)
    num_generations = 4
    rewards = torch.randn(24, generator=gen)
    rewards[8:12] = 1.0  # one group with zero std
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped = mean_grouped.repeat_interleave(num_generations, dim=0)
    std = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1)
    std = std.repeat_interleave(num_generations, dim=0)
    trl_scaled = (rewards - mean_grouped) / (std + 1e-4)
    torch.testing.assert_close(grpo_advantages(rewards, num_generations), trl_scaled,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grpo_advantages(rewards, num_generations, scale_by_std=False),
                               rewards - mean_grouped, atol=1e-5, rtol=1e-5)


def test_rloo_hand_values():
    # groups of 2: the baseline is the other sample
    torch.testing.assert_close(rloo_advantages(t([1.0, 0.0, 0.0, 3.0]), 2),
                               t([1.0 - 0.0, 0.0 - 1.0, 0.0 - 3.0, 3.0 - 0.0]))
    # group of 3: baselines (0 + 0) / 2, (3 + 0) / 2, (3 + 0) / 2
    torch.testing.assert_close(rloo_advantages(t([3.0, 0.0, 0.0]), 3),
                               t([3.0 - 0.0, 0.0 - 1.5, 0.0 - 1.5]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(t([1.0, 2.0]), 1)


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_group_estimators_reject_partial_groups(estimator):
    with pytest.raises(ValueError, match="group_size=4"):
        estimator(torch.zeros(6), 4)


def test_groups_are_contiguous_rows():
    rewards = t([1.0, 0.0, 5.0, 5.0])  # [1, 0] then [5, 5], not interleaved [1, 5], [0, 5]
    torch.testing.assert_close(grpo_advantages(rewards, 2, scale_by_std=False),
                               t([0.5, -0.5, 0.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# REINFORCE++
# ------------------------------------------------------------------------------------------------

def test_reinforce_pp_returns_hand_values():
    rewards = t([[0.1, 0.2, 1.0, 5.0], [2.0, 0.3, 4.0, 1.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 1, 1]])
    gamma = 0.5
    g2 = 1.0
    g1 = 0.2 + gamma * g2
    g0 = 0.1 + gamma * g1
    h3 = 1.0
    h2 = 4.0 + gamma * h3
    h0 = 2.0 + gamma * h2  # the masked 0.3 is skipped
    torch.testing.assert_close(reinforce_pp_returns(rewards, mask, gamma),
                               t([[g0, g1, g2, 0.0], [h0, 0.0, h2, h3]]))
    assert (g0, g1) == (pytest.approx(0.45), pytest.approx(0.7))


def test_reinforce_pp_advantages_whiten_over_the_batch():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])  # the 3.0 is padding
    advantages, returns = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    torch.testing.assert_close(returns, t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    # valid returns 1, 1, 1, 0, 0: mean 0.6, population variance (3 * 0.16 + 2 * 0.36) / 5
    std = math.sqrt((3 * 0.4**2 + 2 * 0.6**2) / 5)
    high, low = 0.4 / std, -0.6 / std
    torch.testing.assert_close(advantages, t([[high, high, high], [low, low, 0.0]]))


# ------------------------------------------------------------------------------------------------
# compute_advantages: the one dispatch the trainer calls
# ------------------------------------------------------------------------------------------------

def test_compute_advantages_group_estimators_subtract_kl_from_scores():
    scores, mask = t([1.0, 0.0]), t([[1.0, 1.0], [1.0, 0.0]])
    kl = t([[0.5, 0.5], [0.0, 0.0]])
    # KL-shaped scores 1 - 0.1 * 1 = 0.9 and 0: group mean 0.45, RLOO baseline the other one.
    rloo, returns = compute_advantages("rloo", scores, mask, group_size=2, kl=kl, kl_coef=0.1)
    torch.testing.assert_close(rloo, t([[0.9, 0.9], [-0.9, 0.0]]))
    assert returns is None
    grpo, _ = compute_advantages("grpo", scores, mask, group_size=2, scale_by_std=False)
    torch.testing.assert_close(grpo, t([[0.5, 0.5], [-0.5, 0.0]]))


def test_compute_advantages_gae_puts_kl_into_token_rewards():
    scores, mask = t([1.0]), t([[1.0, 1.0]])
    kl, values = t([[0.5, 0.5]]), t([[0.0, 0.0]])
    adv, returns = compute_advantages("gae", scores, mask, kl=kl, kl_coef=0.2, values=values,
                                      gamma=1.0, lam=1.0, whiten_advantages=False)
    # token rewards [-0.1, 1 - 0.1]; Monte-Carlo returns with zero values
    torch.testing.assert_close(returns, t([[0.8, 0.9]]))
    torch.testing.assert_close(adv, t([[0.8, 0.9]]))
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", scores, mask)
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages("ppo2", scores, mask)


def test_compute_advantages_reinforce_pp_whitens_returns():
    scores, mask = t([1.0, 0.0]), t([[1.0], [1.0]])
    adv, _ = compute_advantages("reinforce_pp", scores, mask)
    torch.testing.assert_close(adv, t([[1.0], [-1.0]]), atol=1e-6, rtol=0)

"""Tests for align.advantages: hand-computed values, masking, group layout, TRL's GRPO formula."""

from __future__ import annotations

import math

import pytest
import torch

from align.advantages import (
    KL_ESTIMATORS,
    compute_advantages,
    compute_gae,
    grpo_advantages,
    kl_estimator_problem,
    kl_penalty,
    kl_placement,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_level_rewards,
    whiten,
)
from align.config import PPOConfig
from align.errors import ConfigError
from tests.conftest import tiny_ppo_config

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


def test_k3_is_clamped_as_verl_does():
    # d = -100: exp(100) overflows float32 (past 88); veRL clamps -d to 20 and k3 to 10.
    logprobs = torch.tensor([[-100.0, -1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, 0.0]])
    kl = kl_penalty(logprobs, ref, "k3")
    assert torch.isfinite(kl).all(), kl
    assert kl[0, 0].item() == pytest.approx(10.0)
    kl.sum().backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 0] == 0  # clamped: no pull
    # far from the clamps the value is the unclamped formula
    d = torch.tensor([0.3, -0.7, 2.0])
    torch.testing.assert_close(kl_penalty(d, torch.zeros(3), "k3"), torch.exp(-d) - 1 + d)


# Exact expected gradients on a 5-way softmax: every outcome weighted by its probability, no
# sampling. On-policy, a detached reward penalty k gives the policy-gradient surrogate
# sum_x p(x) k(x) log p(x); a loss term gives sum_x p(x) k(x) with p(x) detached.
def exact_kl_gradients(distance: float, estimator: str, in_reward: bool):
    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(5, dtype=F64, generator=gen)
    direction = torch.randn(5, dtype=F64, generator=gen)
    theta = (ref_logits + distance * direction / direction.norm()).requires_grad_()
    ref = torch.log_softmax(ref_logits, -1)
    logp = torch.log_softmax(theta, -1)
    p = logp.exp()
    k = kl_penalty(logp, ref, estimator)
    surrogate = (p.detach() * k.detach() * logp).sum() if in_reward else (p.detach() * k).sum()
    grad = torch.autograd.grad(surrogate, theta, retain_graph=True)[0]
    forward = torch.autograd.grad((p * (logp - ref)).sum(), theta, retain_graph=True)[0]
    reverse = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), theta)[0]
    return grad, forward, reverse


@pytest.mark.parametrize("distance", [0.05, 0.5])
def test_exact_expected_gradient_of_each_estimator_where_it_goes(distance):
    g = {(e, r): exact_kl_gradients(distance, e, r) for e in KL_ESTIMATORS for r in (True, False)}
    forward, reverse = g["k1", True][1], g["k1", True][2]
    torch.testing.assert_close(g["k1", True][0], forward)  # k1 reward: grad KL(pi||ref)
    torch.testing.assert_close(g["k2", False][0], forward)  # k2 loss: grad KL(pi||ref)
    torch.testing.assert_close(g["k3", False][0], reverse)  # k3 loss: grad KL(ref||pi)
    torch.testing.assert_close(g["k1", False][0], torch.zeros_like(forward))  # k1 loss: 0
    torch.testing.assert_close(g["k3", True][0], forward - reverse)  # k3 reward: the difference


def cosine_and_scale(grad: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    return (float(grad @ target / (grad.norm() * target.norm() + 1e-30)),
            float(grad.norm() / target.norm()))


@pytest.mark.parametrize("distance", [0.05, 2.0])
@pytest.mark.parametrize("in_reward", [True, False], ids=["reward", "loss"])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_refused_estimators_are_exactly_those_without_a_kl_gradient(estimator, in_reward,
                                                                    distance):
    grad, forward, _ = exact_kl_gradients(distance, estimator, in_reward)
    cosine, scale = cosine_and_scale(grad, forward)
    if kl_estimator_problem(estimator, in_reward) is None:
        assert cosine > 0.95 and 0.5 < scale < 2, (cosine, scale)
    elif distance < 1:  # refused ones barely pull near the reference (k1 loss: not at all)
        assert scale < 0.05, scale


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_default_kl_estimator_gives_the_gradient_of_a_kl(tmp_path, estimator):
    alg = tiny_ppo_config(tmp_path, f"algorithm.estimator={estimator}").algorithm
    in_reward, kl_estimator = kl_placement(alg.estimator, alg.kl_in_reward, alg.kl_estimator)
    assert in_reward == (estimator in ("gae", "reinforce_pp"))
    for distance in (0.05, 2.0):
        grad, forward, _ = exact_kl_gradients(distance, kl_estimator, in_reward)
        cosine, scale = cosine_and_scale(grad, forward)
        assert cosine > 0.95 and 0.5 < scale < 2, (kl_estimator, distance, cosine, scale)


@pytest.mark.parametrize(("overrides", "named"), [
    (["algorithm.estimator=gae", "algorithm.kl_estimator=k3"], "kl_estimator=k3"),
    (["algorithm.estimator=reinforce_pp", "algorithm.kl_estimator=k2"], "kl_estimator=k2"),
    (["algorithm.estimator=grpo", "algorithm.kl_estimator=k1"], "kl_estimator=k1"),
    (["algorithm.estimator=grpo", "algorithm.kl_in_reward=true", "algorithm.kl_estimator=k3"],
     "kl_in_reward=true"),
])
def test_config_refuses_an_estimator_without_a_kl_gradient(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named) as err:
        tiny_ppo_config(tmp_path, *overrides)
    assert "algorithm.estimator=" in str(err.value) and "algorithm.kl_in_reward" in str(err.value)
    # with no KL weight the estimator only labels a metric: allowed
    assert isinstance(tiny_ppo_config(tmp_path, *overrides, "algorithm.kl_coef=0"), PPOConfig)


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

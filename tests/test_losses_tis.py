"""Truncated importance sampling in the PPO loss, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses import ppo_policy_loss, truncated_importance_weights


def test_weights_are_the_capped_trainer_over_engine_ratio():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    engine = torch.tensor([[-1.5, -1.0, -0.5]])
    weights = truncated_importance_weights(old, engine, cap=1.5)
    # exp(0.5) = 1.6487 capped to 1.5; exp(-1) = 0.3679; exp(0) = 1
    assert weights[0].tolist() == pytest.approx([1.5, math.exp(-1.0), 1.0])
    assert not weights.requires_grad


def test_weighted_loss_and_gradient_by_hand():
    old = torch.tensor([[-1.0, -2.0]])
    engine = torch.tensor([[-1.5, -1.0]])
    logp = old.clone().requires_grad_(True)  # on policy: ratio 1
    adv = torch.tensor([[1.0, 2.0]])
    mask = torch.ones(1, 2)
    weights = truncated_importance_weights(old, engine, cap=1.5)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, token_weights=weights)
    # -(1.5 * 1 * 1 + e^-1 * 1 * 2) / 2 tokens
    assert loss.item() == pytest.approx(-(1.5 + 2 * math.exp(-1.0)) / 2)
    loss.backward()
    # d/dlogp of -w * A * exp(logp - old) / 2 at ratio 1 = -w * A / 2
    assert logp.grad[0].tolist() == pytest.approx([-0.75, -math.exp(-1.0)])
    plain, _ = ppo_policy_loss(old, old, adv, mask, 0.2)
    assert plain.item() == pytest.approx(-1.5)  # no weights: the usual loss

"""Credit across the turns of an episode, by hand: per-turn rewards on their turns' last
tokens, GAE and REINFORCE++ over the model's tokens only (across the environment's masked
gap), GRPO/RLOO broadcasting the episode's return, and group baselines without the episodes
that failed for infrastructure reasons."""

from __future__ import annotations

import pytest
import torch

from align.advantages import compute_advantages, masked_group_advantages

# One episode of 6 positions: model tokens 0-1 (turn 1), environment tokens 2-3, model 4-5.
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
TURNS = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0]])  # turn 1's reward on its last token


def test_gae_credits_turns_across_the_environment_gap():
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4]])  # values in the gap are ignored
    adv, returns = compute_advantages("gae", torch.tensor([1.0]), MASK, values=values,
                                      gamma=1.0, lam=1.0, whiten_advantages=False,
                                      token_rewards=TURNS)
    # rewards over model tokens: [0, 0.5, 0, 1.0]; lam = gamma = 1: A_t = G_t - V_t
    expected = torch.tensor([[1.5 - 0.1, 1.5 - 0.2, 0.0, 0.0, 1.0 - 0.3, 1.0 - 0.4]])
    assert torch.allclose(adv, expected)
    assert torch.allclose(returns, torch.tensor([[1.5, 1.5, 0.0, 0.0, 1.0, 1.0]]))
    # one-step TD (lam 0): the last token of turn 1 bootstraps from turn 2's first value
    adv0, _ = compute_advantages("gae", torch.tensor([1.0]), MASK, values=values, gamma=1.0,
                                 lam=0.0, whiten_advantages=False, token_rewards=TURNS)
    assert adv0[0, 1].item() == pytest.approx(0.5 + 0.3 - 0.2)


def test_reinforce_pp_returns_sum_turn_rewards_over_model_tokens():
    from align.advantages import reinforce_pp_returns, token_level_rewards

    rewards = token_level_rewards(torch.tensor([1.0]), MASK, None, 0.0) + TURNS * MASK
    returns = reinforce_pp_returns(rewards, MASK, gamma=0.5)
    # G_5 = 1, G_4 = 0.5, G_1 = 0.5 + 0.5 * 0.5 (the gap is skipped), G_0 = 0.5 * G_1
    assert torch.allclose(returns, torch.tensor([[0.375, 0.75, 0.0, 0.0, 0.5, 1.0]]))


def test_grpo_broadcasts_the_episode_return_with_its_turn_rewards():
    mask = MASK.repeat(2, 1)
    turns = torch.cat([TURNS, torch.zeros(1, 6)])
    adv, _ = compute_advantages("grpo", torch.tensor([1.0, 1.0]), mask, group_size=2,
                                scale_by_std=False, token_rewards=turns)
    # returns 1.5 and 1.0, mean 1.25: +0.25 and -0.25 on every model token, 0 in the gap
    assert torch.allclose(adv, torch.tensor([[0.25, 0.25, 0, 0, 0.25, 0.25],
                                             [-0.25, -0.25, 0, 0, -0.25, -0.25]]))


def test_failed_episodes_are_out_of_their_groups_baseline():
    scores = torch.tensor([1.0, 0.0, 0.0, 5.0])  # the last one failed (its reward is noise)
    valid = torch.tensor([True, True, True, False])
    grpo = masked_group_advantages("grpo", scores, valid, 4, scale_by_std=True, eps=0.0)
    mean, std = 1 / 3, torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert grpo.tolist() == pytest.approx([(1 - mean) / std, -mean / std, -mean / std, 0.0])
    rloo = masked_group_advantages("rloo", scores, valid, 4)
    assert rloo.tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0])
    # a group left with one episode gives it 0; the full mask is plain GRPO
    lone = masked_group_advantages("grpo", torch.tensor([1.0, 2.0]),
                                   torch.tensor([True, False]), 2)
    assert lone.tolist() == [0.0, 0.0]
    lone = masked_group_advantages("rloo", torch.tensor([1.0, 2.0]),
                                   torch.tensor([True, False]), 2)
    assert lone.tolist() == [0.0, 0.0]
    mask = torch.ones(4, 3)
    everything, _ = compute_advantages("rloo", scores, mask, group_size=4,
                                       valid=torch.ones(4, dtype=torch.bool))
    plain, _ = compute_advantages("rloo", scores, mask, group_size=4)
    assert torch.equal(everything, plain)
    out, _ = compute_advantages("rloo", scores, mask, group_size=4, valid=valid)
    assert torch.allclose(out[:, 0], torch.tensor([1.0, -0.5, -0.5, 0.0]))

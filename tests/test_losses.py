"""Tests for align.losses: hand-computed values, PPO clip boundaries, masking, TRL parity."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.losses import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    aggregation_normalizer,
    dpo_loss,
    entropy_from_logits,
    masked_mean,
    nll_loss,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_loss,
    preference_metrics,
    rpo_nll_share,
    sequence_logps,
    simpo_loss,
)

F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def softplus(x: float) -> float:
    """-logsigmoid(-x) = log(1 + e^x), written out so tests do not reuse the code under test."""
    return math.log(1 + math.exp(x))


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------

def test_masked_mean_ignores_masked_values_and_empty_rows_give_zero():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 0, 1], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 3) / 2)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), t([(1 + 3) / 2, 0.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_sequence_logps_sum_and_average():
    token_logps = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0], [7.0, 7.0, 7.0]])
    mask = t([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), t([-1 - 2, -0.5 - 0.5, 0.0]))
    torch.testing.assert_close(sequence_logps(token_logps, mask.bool(), average=True),
                               t([(-1 - 2) / 2, (-0.5 - 0.5) / 2, 0.0]))


def test_entropy_from_logits():
    probs = [0.5, 0.25, 0.25]
    logits = t([[[math.log(p) + 3.0 for p in probs], [0.0, 0.0, 0.0]]])  # (1, 2, 3)
    expected = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), math.log(3)]
    torch.testing.assert_close(entropy_from_logits(logits), t([expected], torch.float32))


# ------------------------------------------------------------------------------------------------
# Pairwise (reward model)
# ------------------------------------------------------------------------------------------------

def test_pairwise_loss_hand_values():
    chosen, rejected = t([2.0, 0.0]), t([1.0, 1.0])
    # diffs 1 and -1: -logsigmoid(d) = log(1 + e^-d)
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(
        (softplus(-1.0) + softplus(1.0)) / 2)
    # margins 0.5 and 0: diffs 0.5 and -1
    assert pairwise_loss(chosen, rejected, margin=t([0.5, 0.0])).item() == pytest.approx(
        (softplus(-0.5) + softplus(1.0)) / 2)
    # centring: 0.1 * mean((2 + 1)^2, (0 + 1)^2) = 0.1 * 5
    assert pairwise_loss(chosen, rejected, center_coef=0.1).item() == pytest.approx(
        (softplus(-1.0) + softplus(1.0)) / 2 + 0.1 * (9 + 1) / 2)


def test_preference_metrics_hand_values():
    metrics = preference_metrics(t([1.0, -1.0, 0.5]), t([0.0, 0.0, 0.5]))
    assert metrics["rewards/chosen"].item() == pytest.approx((1 - 1 + 0.5) / 3)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.5 / 3)
    assert metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["rewards/margins"].item() == pytest.approx((1 - 1 + 0) / 3)


# ------------------------------------------------------------------------------------------------
# DPO family
# ------------------------------------------------------------------------------------------------

# policy chosen -10, rejected -12; reference -11 for both: log-ratios +1 and -1, h = 2
DPO_ARGS = (t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]))


def test_dpo_sigmoid_hand_value_and_rewards():
    out = dpo_loss(*DPO_ARGS, beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.1 * 2))
    assert out.chosen_rewards.item() == pytest.approx(0.1 * 1)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * -1)


def test_dpo_sigmoid_label_smoothing_hand_value():
    out = dpo_loss(*DPO_ARGS, beta=0.1, label_smoothing=0.1)
    # (1 - 0.1) * -logsigmoid(0.2) + 0.1 * -logsigmoid(-0.2)
    assert out.losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2))


def test_dpo_ipo_hand_value():
    out = dpo_loss(*DPO_ARGS, beta=0.1, loss_type="ipo", chosen_lengths=t([2.0]),
                   rejected_lengths=t([4.0]))
    # h_avg = 1/2 - (-1/4) = 0.75; target 1 / (2 * 0.1) = 5
    assert out.losses.item() == pytest.approx((0.75 - 5) ** 2)
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # rewards stay on summed log-ratios


def test_dpo_hinge_hand_value():
    assert dpo_loss(*DPO_ARGS, beta=0.1, loss_type="hinge").losses.item() == pytest.approx(
        1 - 0.2)
    assert dpo_loss(*DPO_ARGS, beta=1.0, loss_type="hinge").losses.item() == 0.0  # 1 - 2 < 0


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*DPO_ARGS, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*DPO_ARGS, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(*DPO_ARGS, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*DPO_ARGS, beta=0.1, label_smoothing=0.5)


def test_preference_loss_table_dispatches_each_variant():
    lengths = t([2.0]), t([4.0])
    logps = PreferenceLogps(t([-10.0]), t([-12.0]), *lengths, t([-11.0]), t([-11.0]))
    assert preference_loss("sigmoid", logps, beta=0.1).losses.item() == pytest.approx(
        softplus(-0.2))
    assert preference_loss("ipo", logps, beta=0.1).losses.item() == pytest.approx(
        (0.75 - 5) ** 2)
    assert preference_loss("hinge", logps, beta=0.1).losses.item() == pytest.approx(0.8)
    # simpo: per-token means -5 and -3, z = 2 * (-5 + 3) - 0.5 = -4.5
    reference_free = logps._replace(ref_chosen=None, ref_rejected=None)
    assert preference_loss("simpo", reference_free, beta=2.0, gamma=0.5).losses.item() == (
        pytest.approx(softplus(4.5)))
    assert not PREFERENCE_LOSSES["simpo"].needs_reference
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", reference_free, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss("nope", logps, beta=0.1)


def test_rpo_nll_shares_add_up_to_the_global_token_mean():
    # two micro-batches: chosen log-probs -6 (3 tokens) and -2 (1 token): global mean 8 / 4
    first = rpo_nll_share(t([-6.0]), t([3.0]), num_chosen_tokens=4.0)
    second = rpo_nll_share(t([-2.0]), t([1.0]), num_chosen_tokens=4.0)
    assert (first + second).item() == pytest.approx(2.0)


def test_dpo_gradient_only_through_policy_terms():
    policy_c = t([-10.0]).requires_grad_()
    out = dpo_loss(policy_c, t([-12.0]), t([-11.0]), t([-11.0]), beta=0.1)
    out.losses.sum().backward()
    # d/dx -logsigmoid(0.1 * (x - c)) = -0.1 * sigmoid(-0.2) at h = 2
    assert policy_c.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))
    assert not out.chosen_rewards.requires_grad


def test_simpo_hand_value():
    out = simpo_loss(t([-0.5]), t([-1.0]), beta=2.0, gamma=0.5)
    # z = 2 * (-0.5 + 1.0) - 0.5 = 0.5
    assert out.losses.item() == pytest.approx(softplus(-0.5))
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (-1.0, -2.0)
    smoothed = simpo_loss(t([-0.5]), t([-1.0]), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert smoothed.losses.item() == pytest.approx(0.8 * softplus(-0.5) + 0.2 * softplus(0.5))


def test_nll_loss_token_and_sequence():
    chosen_logps, lengths = t([-4.0, -2.0]), t([4.0, 1.0])
    assert nll_loss(chosen_logps, lengths).item() == pytest.approx((4 + 2) / (4 + 1))
    assert nll_loss(chosen_logps, lengths, "sequence").item() == pytest.approx((4 / 4 + 2 / 1) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        nll_loss(chosen_logps, lengths, "batch")


# ------------------------------------------------------------------------------------------------
# PPO policy loss: clip boundaries
# ------------------------------------------------------------------------------------------------

def policy_loss_at(ratio: float | torch.Tensor, advantage: float, **kwargs):
    """Loss, clip ratio and d loss / d logprob for one token with the given probability ratio."""
    old = t([[0.0]])
    ratio = ratio if isinstance(ratio, torch.Tensor) else t([[ratio]])
    logprobs = torch.log(ratio).requires_grad_()
    loss, clip = ppo_policy_loss(logprobs, old, t([[advantage]]), t([[1.0]]), **kwargs)
    loss.backward()
    return loss.item(), clip.item(), logprobs.grad.item()


def test_ppo_clip_exactly_at_boundary_is_not_clipped():
    ratio = torch.exp(torch.log(t([[1.2]])))  # whatever exp gives; eps is set to hit it exactly
    eps = ratio.item() - 1
    loss, clip, grad = policy_loss_at(ratio, 2.0, clip_eps_low=eps)
    assert loss == pytest.approx(-2.0 * (1 + eps))
    assert clip == 0.0
    assert grad == pytest.approx(-2.0 * (1 + eps))  # d(-A r)/d logp = -A r; the kink passes it


def test_ppo_clip_just_below_and_above_upper_boundary():
    loss, clip, grad = policy_loss_at(1.19, 2.0, clip_eps_low=0.2)
    assert (loss, clip) == (pytest.approx(-2.0 * 1.19), 0.0)
    assert grad == pytest.approx(-2.0 * 1.19)
    loss, clip, grad = policy_loss_at(1.21, 2.0, clip_eps_low=0.2)
    assert (loss, clip, grad) == (pytest.approx(-2.0 * 1.2), 1.0, 0.0)


def test_ppo_negative_advantage_clips_below_and_not_above():
    # A < 0 and r < 1 - eps: surr1 = -0.7, surr2 = -0.8, min = -0.8 -> clipped, no gradient
    loss, clip, grad = policy_loss_at(0.7, -1.0, clip_eps_low=0.2)
    assert (loss, clip, grad) == (pytest.approx(0.8), 1.0, 0.0)
    # A < 0 and r just above 1 - eps: unclipped
    loss, clip, grad = policy_loss_at(0.81, -1.0, clip_eps_low=0.2)
    assert (loss, clip, grad) == (pytest.approx(0.81), 0.0, pytest.approx(0.81))
    # A < 0 and r > 1 + eps: the pessimistic min keeps the unclipped term, gradient flows
    loss, clip, grad = policy_loss_at(1.5, -1.0, clip_eps_low=0.2)
    assert (loss, clip, grad) == (pytest.approx(1.5), 0.0, pytest.approx(1.5))
    # A > 0 and r < 1 - eps: likewise unclipped
    loss, clip, _ = policy_loss_at(0.5, 1.0, clip_eps_low=0.2)
    assert (loss, clip) == (pytest.approx(-0.5), 0.0)


def test_ppo_asymmetric_clip_higher():
    assert policy_loss_at(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.28)[:2] == (
        pytest.approx(-1.25), 0.0)
    assert policy_loss_at(1.3, 1.0, clip_eps_low=0.2, clip_eps_high=0.28)[:2] == (
        pytest.approx(-1.28), 1.0)
    assert policy_loss_at(0.75, -1.0, clip_eps_low=0.2, clip_eps_high=0.28)[:2] == (
        pytest.approx(0.8), 1.0)


def test_ppo_dual_clip():
    # A = -1, r = 5: min(-5, -1.2) = -5, bounded below by 3 * A = -3 -> loss 3, no gradient
    loss, _, grad = policy_loss_at(5.0, -1.0, clip_eps_low=0.2, dual_clip=3.0)
    assert (loss, grad) == (pytest.approx(3.0), 0.0)
    # r = 2.5: -2.5 > -3, the bound is inactive
    loss, _, grad = policy_loss_at(2.5, -1.0, clip_eps_low=0.2, dual_clip=3.0)
    assert (loss, grad) == (pytest.approx(2.5), pytest.approx(2.5))
    # positive advantages are untouched by the dual clip
    assert policy_loss_at(5.0, 1.0, clip_eps_low=0.2, dual_clip=3.0)[0] == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss_at(1.0, 1.0, clip_eps_low=0.2, dual_clip=1.0)


def test_clip_ratio_counts_dual_clipped_tokens():
    # A = -1, r = 5, c = 3: the dual clip bounds the loss (no gradient): a clipped token
    assert policy_loss_at(5.0, -1.0, clip_eps_low=0.2, dual_clip=3.0)[1:] == (1.0, 0.0)
    # r = 2.5 < c: neither clip is active, the ratio carries the gradient
    assert policy_loss_at(2.5, -1.0, clip_eps_low=0.2, dual_clip=3.0)[1] == 0.0
    # r = 0.5, A = -1: the ordinary lower clip, counted with or without a dual clip
    assert policy_loss_at(0.5, -1.0, clip_eps_low=0.2, dual_clip=3.0)[1:] == (1.0, 0.0)
    # exactly at c (whatever exp gives; c is set to hit it): not clipped, as at the PPO bounds
    ratio = torch.exp(torch.log(t([[3.0]])))
    assert policy_loss_at(ratio, -1.0, clip_eps_low=0.2, dual_clip=ratio.item())[1] == 0.0


def test_ppo_aggregation_and_masking():
    advantages = t([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0], [50.0, 50.0, 50.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    logprobs = t([[-1.0, -2.0, -3.0], [-1.0, 7.0, 7.0], [3.0, 3.0, 3.0]])
    old = logprobs.clone()
    old[1, 1:] = -5.0  # masked positions with ratio far from 1 must not count as clipped
    token, clip = ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    assert token.item() == pytest.approx(-(1 + 2 + 3 + 10) / 4)  # ratio 1 everywhere valid
    assert clip.item() == 0.0
    sequence, _ = ppo_policy_loss(logprobs, old, advantages, mask, 0.2, aggregation="sequence")
    assert sequence.item() == pytest.approx(-((1 + 2 + 3) / 3 + 10 / 1) / 2)  # empty row left out
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(logprobs, old, advantages, mask, 0.2, aggregation="batch")


def test_ppo_sequence_advantages_broadcast_over_tokens():
    logprobs = torch.zeros(2, 3, dtype=F64)
    mask = t([[1, 1, 0], [1, 1, 1]])
    loss, _ = ppo_policy_loss(logprobs, logprobs, t([1.0, -2.0]), mask, 0.2)
    assert loss.item() == pytest.approx(-(1 + 1 - 2 - 2 - 2) / 5)


# ------------------------------------------------------------------------------------------------
# PPO value loss
# ------------------------------------------------------------------------------------------------

def test_value_loss_clipped_and_unclipped():
    mask = t([[1.0, 1.0, 0.0]])
    values, old, returns = t([[2.0, 0.0, 50.0]]), t([[1.0, 1.0, 0.0]]), t([[0.0, 0.0, 0.0]])
    # token 0: unclipped (2 - 0)^2 = 4; clipped v = 1 + 0.5 = 1.5 -> 2.25; max 4 (unclipped)
    # token 1: unclipped 0; clipped v = 1 - 0.5 = 0.5 -> 0.25; max 0.25 (clipped)
    loss, clip = ppo_value_loss(values, old, returns, mask, clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * (4 + 0.25) / 2)
    assert clip.item() == pytest.approx(1 / 2)
    loss, clip = ppo_value_loss(values, old, returns, mask)
    assert (loss.item(), clip.item()) == (pytest.approx(0.5 * (4 + 0) / 2), 0.0)


def test_value_loss_sequence_aggregation():
    values = t([[1.0, 3.0], [2.0, 9.0]])
    returns = torch.zeros(2, 2, dtype=F64)
    mask = t([[1, 1], [1, 0]])
    loss, _ = ppo_value_loss(values, values, returns, mask, aggregation="sequence")
    assert loss.item() == pytest.approx(0.5 * ((1 + 9) / 2 + 4 / 1) / 2)


# ------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 (the trainers' own loss code, run on a stand-in model)
# ------------------------------------------------------------------------------------------------

class _Identity:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _preference_batch(seed: int = 0, pairs: int = 4, length: int = 6):
    """Token log-probs (2P, L-1) and completion mask (2P, L) laid out as TRL's DPO batch:
    chosen rows first, then rejected; position 0 is prompt, completions right-padded."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length, (2 * pairs,), generator=gen)
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        completion_mask[row, 1:1 + n] = 1
    token_logps = -torch.rand(2 * pairs, length - 1, generator=gen) * 3
    token_logps = token_logps * completion_mask[:, 1:]  # the fused head gives 0 off-completion
    ref = -torch.rand(2 * pairs, generator=gen) * 3 * lengths
    return token_logps, completion_mask, ref


def _trl_dpo(loss_type: str, token_logps, completion_mask, ref, beta: float,
             label_smoothing: float = 0.0):
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _Identity()
    trainer.aux_loss_enabled, trainer.precompute_ref_logps = False, True
    trainer.ld_alpha, trainer.f_divergence_type, trainer.use_weighting = None, "reverse_kl", False
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    rows, width = token_logps.shape
    outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros(rows, width),
                              mean_logits=torch.zeros(rows, width),
                              is_top1=torch.zeros(rows, width, dtype=torch.bool))
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _ours(loss_type: str, token_logps, completion_mask, ref, beta: float,
          label_smoothing: float = 0.0):
    shift_mask = completion_mask[:, 1:]
    policy_c, policy_r = sequence_logps(token_logps, shift_mask).chunk(2)
    ref_c, ref_r = ref.chunk(2)
    lengths_c, lengths_r = shift_mask.sum(-1).float().chunk(2)
    return dpo_loss(policy_c, policy_r, ref_c, ref_r, beta, loss_type, label_smoothing,
                    chosen_lengths=lengths_c, rejected_lengths=lengths_r)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl_per_pair_and_metrics(loss_type):
    pytest.importorskip("trl")
    token_logps, completion_mask, ref = _preference_batch()
    pairs = token_logps.size(0) // 2
    beta = 0.5 if loss_type == "ipo" else 0.1
    ours = _ours(loss_type, token_logps, completion_mask, ref, beta)
    for i in range(pairs):  # one pair at a time: TRL returns only the batch mean
        rows = [i, pairs + i]
        trl_loss, _ = _trl_dpo(loss_type, token_logps[rows], completion_mask[rows], ref[rows],
                               beta)
        assert ours.losses[i].item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    trl_loss, trl_metrics = _trl_dpo(loss_type, token_logps, completion_mask, ref, beta)
    assert ours.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    metrics = preference_metrics(ours.chosen_rewards, ours.rejected_rewards)
    for key, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_dpo_label_smoothing_matches_trl_cdpo_forms():
    """TRL 1.16's `sigmoid` ignores label_smoothing; its conservative-DPO formula survives in
    `aot` (per pair, after sorting: inputs are pre-sorted so sorting is the identity) and in
    CPOTrainer's `sigmoid` (the reference-free form: reference log-probs of 0)."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    gen = torch.Generator().manual_seed(1)
    pairs, length = 5, 4
    # ascending policy and reference log-ratio differences, so `aot`'s sorting is the identity
    ref_r = -torch.rand(pairs, generator=gen) * 5
    ref_c = ref_r + torch.linspace(-1.0, 1.0, pairs)
    policy_r = -torch.rand(pairs, generator=gen) * 5
    policy_c = policy_r + torch.linspace(-3.0, 3.0, pairs)
    token_logps = torch.zeros(2 * pairs, length - 1)
    token_logps[:, 0] = torch.cat([policy_c, policy_r])  # one completion token per row
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    completion_mask[:, 1] = 1
    ref = torch.cat([ref_c, ref_r])
    ours = _ours("sigmoid", token_logps, completion_mask, ref, 0.3, label_smoothing=0.2)
    trl_loss, _ = _trl_dpo("aot", token_logps, completion_mask, ref, 0.3, label_smoothing=0.2)
    assert ours.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)

    cpo = object.__new__(CPOTrainer)
    cpo.alpha, cpo.beta, cpo.label_smoothing, cpo.loss_type = 0.0, 0.3, 0.2, "sigmoid"
    cpo.accelerator = _Identity()
    trl_losses, trl_chosen, trl_rejected = cpo.cpo_loss(policy_c, policy_r)
    zero = torch.zeros(pairs)
    ours = dpo_loss(policy_c, policy_r, zero, zero, 0.3, label_smoothing=0.2)
    torch.testing.assert_close(ours.losses, trl_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(label_smoothing):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    gen = torch.Generator().manual_seed(2)
    chosen_avg, rejected_avg = -torch.rand(8, generator=gen) * 2, -torch.rand(8, generator=gen) * 2
    cpo = object.__new__(CPOTrainer)
    cpo.alpha, cpo.beta, cpo.simpo_gamma, cpo.loss_type = 0.0, 2.5, 1.2, "simpo"
    cpo.label_smoothing, cpo.accelerator = label_smoothing, _Identity()
    trl_losses, trl_chosen, trl_rejected = cpo.cpo_loss(chosen_avg, rejected_avg)
    ours = simpo_loss(chosen_avg, rejected_avg, beta=2.5, gamma=1.2,
                      label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.losses, trl_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected)


def test_nll_loss_matches_trl_dpo_sft_term():
    pytest.importorskip("trl")
    token_logps, completion_mask, ref = _preference_batch(seed=3)
    trl_loss, _ = _trl_dpo("sft", token_logps, completion_mask, ref, 0.1)
    shift_mask = completion_mask[:, 1:]
    chosen_logps = sequence_logps(token_logps, shift_mask).chunk(2)[0]
    chosen_lengths = shift_mask.sum(-1).chunk(2)[0]
    assert nll_loss(chosen_logps, chosen_lengths).item() == pytest.approx(trl_loss.item(),
                                                                          abs=1e-5)


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_loss_matches_trl_reward_trainer(with_margin):
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(12, 1, generator=gen) * 2  # 6 chosen rows, then 6 rejected
    margin = torch.rand(6, generator=gen)
    trainer = object.__new__(RewardTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _Identity()
    trainer.args = SimpleNamespace(center_rewards_coefficient=0.05)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long),
              "attention_mask": torch.ones(12, 3, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = trainer.compute_loss(lambda **kwargs: SimpleNamespace(logits=scores), inputs)
    chosen, rejected = scores.squeeze(-1).chunk(2)
    ours = pairwise_loss(chosen, rejected, margin if with_margin else None, center_coef=0.05)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    metrics = preference_metrics(chosen, rejected)
    trl_metrics = trainer._metrics["train"]
    assert metrics["rewards/accuracies"].item() == pytest.approx(trl_metrics["accuracy"][0])
    assert metrics["rewards/margins"].item() == pytest.approx(trl_metrics["margin"][0], abs=1e-6)


def test_ppo_losses_with_global_normalizer_do_not_depend_on_the_split():
    """Summing micro-batch losses normalised by the global count equals the whole-batch loss."""
    torch.manual_seed(0)
    logp, old = torch.randn(4, 5), torch.randn(4, 5)
    adv, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).float()
    mask[:, 0] = 1
    for aggregation, count in (("token", mask.sum()), ("sequence", torch.tensor(4.0))):
        whole, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, aggregation=aggregation)
        parts = sum(ppo_policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                                    0.2, aggregation=aggregation, normalizer=float(count))[0]
                    for i in (0, 2))
        torch.testing.assert_close(parts, whole)
        v_whole, _ = ppo_value_loss(logp, old, adv, mask, 0.2, aggregation=aggregation)
        v_parts = sum(ppo_value_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                                     0.2, aggregation=aggregation, normalizer=float(count))[0]
                      for i in (0, 2))
        torch.testing.assert_close(v_parts, v_whole)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_global_normalizer_leaves_out_empty_sequences_as_the_local_mean_does(aggregation):
    """A sequence with no valid token counts in neither path: micro-batch losses divided by
    aggregation_normalizer of the whole batch add up to the whole batch's own mean."""
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    mask[:, 0], mask[1] = 1, 0  # row 1 has no valid token
    normalizer = aggregation_normalizer(mask, aggregation)
    for loss_fn in (ppo_policy_loss, ppo_value_loss):
        whole, _ = loss_fn(logp, old, adv, mask, 0.2, aggregation=aggregation)
        parts = sum(loss_fn(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2,
                            aggregation=aggregation, normalizer=normalizer)[0] for i in (0, 2))
        torch.testing.assert_close(parts, whole)
    assert aggregation_normalizer(torch.zeros(2, 3), aggregation) == 1.0


def test_aggregation_normalizer_counts_per_mode():
    from align.losses import aggregation_normalizer

    mask = t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregation_normalizer(mask, "token") == 3.0
    assert aggregation_normalizer(mask, "sequence") == 2.0  # the empty sequence is left out
    assert aggregation_normalizer(mask, "constant", max_new_tokens=4) == 12.0  # 3 rows x 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregation_normalizer(mask, "constant")

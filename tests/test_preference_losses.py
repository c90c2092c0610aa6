"""KTO and ORPO (align.preference_losses): hand-computed values and parity with TRL 1.16."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.losses import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    gather_logprobs,
    kto_kl_baseline,
    kto_loss,
    nll_loss,
    orpo_loss,
    preference_loss,
    sequence_logps,
    shift_for_next_token,
)

F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


class _Identity:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


# ------------------------------------------------------------------------------- KTO by hand


def test_kto_kl_baseline_is_the_clamped_mean_log_ratio():
    assert kto_kl_baseline(t([1.0, 2.0]), t([0.5, 0.5])).item() == pytest.approx(1.0)
    # mean (0.5 - 1.0) / 2 < 0: clamped to 0, as TRL
    assert kto_kl_baseline(t([-1.0, -2.0]), t([-1.5, -1.0])).item() == 0.0
    policy = t([1.0, 2.0]).requires_grad_()
    assert not kto_kl_baseline(policy, t([0.0, 0.0])).requires_grad


def test_kto_loss_hand_computed_with_weights():
    out = kto_loss(t([-1.0, -2.0]), t([-3.0]), t([-2.0, -2.0]), t([-2.0]), kl=0.5, beta=0.1,
                   desirable_weight=1.5, undesirable_weight=0.5)
    # desirable r = 1, 0: 1 - sigmoid(beta (r - z0)); undesirable r = -1: 1 - sigmoid(beta (z0 - r))
    expected = [1.5 * (1 - sigmoid(0.05)), 1.5 * (1 - sigmoid(-0.05)), 0.5 * (1 - sigmoid(0.15))]
    assert out.losses.tolist() == pytest.approx(expected)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1])


def test_kto_loss_with_one_side_empty():
    empty = torch.zeros(0, dtype=F64)
    out = kto_loss(t([-1.0]), empty, t([-1.0]), empty, kl=0.0, beta=1.0)
    assert out.losses.tolist() == pytest.approx([0.5])
    assert out.rejected_rewards.numel() == 0


def test_kto_table_entry_is_unpaired_and_needs_the_baseline():
    entry = PREFERENCE_LOSSES["kto"]
    assert (entry.data, entry.needs_reference, entry.includes_nll) == ("unpaired", True, False)
    logps = PreferenceLogps(t([-1.0]), t([-3.0]), t([1.0]), t([1.0]), t([-2.0]), t([-2.0]))
    with pytest.raises(ValueError, match="KL baseline"):
        preference_loss("kto", logps, beta=0.1)
    out = preference_loss("kto", logps._replace(kl=t(0.5)), beta=0.1, desirable_weight=2.0)
    assert out.losses.tolist() == pytest.approx([2 * (1 - sigmoid(0.05)), 1 - sigmoid(0.15)])


# ------------------------------------------------------------------------------ ORPO by hand


def test_orpo_loss_hand_computed():
    # p_c = 0.5 (odds 1), p_r = 0.2 (odds 0.25): log odds ratio = log 4
    out = orpo_loss(t([math.log(0.5)]), t([math.log(0.2)]), beta=0.1)
    assert out.losses.item() == pytest.approx(-0.1 * math.log(sigmoid(math.log(4.0))))
    assert out.chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5))
    assert out.rejected_rewards.item() == pytest.approx(0.1 * math.log(0.2))


def test_orpo_certain_completion_gives_finite_loss_and_gradient():
    chosen = t([0.0]).requires_grad_()  # mean log-prob exactly 0: log(1 - p) would be -inf
    out = orpo_loss(chosen, t([-2.0]), beta=0.1)
    out.losses.sum().backward()
    assert math.isfinite(out.losses.item()) and math.isfinite(chosen.grad.item())


def test_orpo_entry_is_reference_free_on_mean_logps_and_includes_nll():
    entry = PREFERENCE_LOSSES["orpo"]
    assert (entry.needs_reference, entry.includes_nll, entry.data) == (False, True, "paired")
    logps = PreferenceLogps(t([-2.0]), t([-6.0]), t([4.0]), t([3.0]))
    expected = orpo_loss(t([-0.5]), t([-2.0]), beta=0.2).losses
    assert preference_loss("orpo", logps, beta=0.2).losses.tolist() == pytest.approx(
        expected.tolist())


# ------------------------------------------------------------------- parity with TRL 1.16


def _trl_kto(token_logps, completion_mask, kl_token_logps, kl_mask, labels, ref, ref_kl,
             beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer._compute_loss on a stand-in model returning the given log-probs."""
    from trl.trainer.kto_trainer import KTOTrainer

    trainer = object.__new__(KTOTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _Identity()
    trainer.calculate_KL, trainer.precompute_ref_logps, trainer.aux_loss_enabled = True, True, False
    trainer.loss_type, trainer.beta = "kto", beta
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    rows, width = token_logps.shape
    kl_ids = torch.zeros_like(kl_mask)

    def outputs(logps):
        return SimpleNamespace(log_probs=logps, entropy=torch.zeros(rows, width),
                               mean_logits=torch.zeros(rows, width))

    def model(**kwargs):
        return outputs(kl_token_logps if kwargs["input_ids"] is kl_ids else token_logps)

    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "KL_input_ids": kl_ids,
              "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
              "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _unpaired_batch(seed: int, rows: int = 6, length: int = 6):
    gen = torch.Generator().manual_seed(seed)

    def side():
        lengths = torch.randint(1, length, (rows,), generator=gen)
        mask = torch.zeros(rows, length, dtype=torch.long)
        for row, n in enumerate(lengths.tolist()):
            mask[row, 1:1 + n] = 1  # position 0 is the prompt
        logps = -torch.rand(rows, length - 1, generator=gen) * 3 * mask[:, 1:]
        return logps, mask

    (token_logps, mask), (kl_logps, kl_mask) = side(), side()
    labels = torch.tensor([True, False, True, True, False, False][:rows])
    return token_logps, mask, kl_logps, kl_mask, labels, gen


@pytest.mark.parametrize(("shift", "weights"), [(-2.0, (1.0, 1.0)), (3.0, (1.33, 0.7))])
def test_kto_matches_trl_loss_baseline_and_metrics(shift, weights):
    """`shift` moves the reference of the mismatched pairs, so the KL estimate is clamped at 0
    in one case and positive in the other."""
    pytest.importorskip("trl")
    token_logps, mask, kl_token_logps, kl_mask, labels, gen = _unpaired_batch(seed=7)
    policy = token_logps.sum(-1)
    ref = policy + torch.randn(len(policy), generator=gen)
    kl_policy = kl_token_logps.sum(-1)
    ref_kl = kl_policy - shift + 0.1 * torch.randn(len(policy), generator=gen)
    beta = 0.2
    trl_loss, trl_metrics = _trl_kto(token_logps, mask, kl_token_logps, kl_mask, labels, ref,
                                     ref_kl, beta, *weights)
    kl = kto_kl_baseline(kl_policy, ref_kl)
    assert kl.item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    assert (kl.item() > 0) == (shift > 0)
    lengths = mask[:, 1:].sum(-1).float()
    logps = PreferenceLogps(policy[labels], policy[~labels], lengths[labels], lengths[~labels],
                            ref[labels], ref[~labels], kl)
    ours = preference_loss("kto", logps, beta, desirable_weight=weights[0],
                           undesirable_weight=weights[1])
    assert ours.losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert ours.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"],
                                                              abs=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"],
                                                                abs=1e-5)


def test_orpo_matches_trl_odds_ratio_and_full_loss():
    """TRL's ORPOTrainer on a stand-in model: per-pair odds-ratio terms, and the full loss
    (NLL of chosen + the mean odds-ratio term) with a one-token prompt, where TRL's NLL over
    "prompt and response" covers exactly the completion tokens (the first token is never a
    target)."""
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    gen = torch.Generator().manual_seed(5)
    pairs, length, vocab = 4, 7, 11
    logits = torch.randn(2 * pairs, length, vocab, generator=gen) * 2
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    lengths = torch.randint(2, length, (2 * pairs,), generator=gen)
    attention = (torch.arange(length)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, 0] = -100  # the one-token prompt
    trainer = object.__new__(ORPOTrainer)
    trainer.beta, trainer.accelerator, trainer.aux_loss_enabled = 0.25, _Identity(), False
    trainer.is_encoder_decoder, trainer.padding_value = False, 0
    batch = {"chosen_input_ids": ids[:pairs], "chosen_attention_mask": attention[:pairs],
             "chosen_labels": labels[:pairs], "rejected_input_ids": ids[pairs:],
             "rejected_attention_mask": attention[pairs:], "rejected_labels": labels[pairs:]}
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(
        lambda *args, **kwargs: SimpleNamespace(logits=logits), batch)

    shifted_logits, shifted_labels = shift_for_next_token(logits, labels)
    mask = shifted_labels != -100
    summed = sequence_logps(gather_logprobs(shifted_logits, shifted_labels), mask)
    counts = mask.sum(-1).float()
    (chosen, rejected), (chosen_len, rejected_len) = summed.chunk(2), counts.chunk(2)
    ours = preference_loss("orpo", PreferenceLogps(chosen, rejected, chosen_len, rejected_len),
                           beta=0.25)
    trl_losses, *_ = trainer.odds_ratio_loss(chosen / chosen_len, rejected / rejected_len)
    torch.testing.assert_close(ours.losses, -trl_losses, atol=1e-5, rtol=1e-5)
    total = ours.losses.mean() + nll_loss(chosen, chosen_len)
    assert total.item() == pytest.approx(trl_loss.item(), abs=1e-5, rel=1e-5)
    assert ours.chosen_rewards.mean().item() == pytest.approx(trl_metrics["rewards/chosen"],
                                                              abs=1e-5)
    assert ours.rejected_rewards.mean().item() == pytest.approx(trl_metrics["rewards/rejected"],
                                                                abs=1e-5)

"""Dr. GRPO (constant normaliser) and GSPO (sequence-level ratio): by hand and against TRL."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.advantages import grpo_advantages
from align.losses import aggregate, gather_logprobs, ppo_policy_loss, sequence_level_logprobs
from align.trainers.ppo_objectives import ppo_objective

F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------------------- by hand


def test_constant_aggregation_divides_the_token_sum_by_the_normalizer():
    per_token = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert aggregate(per_token, mask, "constant", 6.0).item() == pytest.approx((1 + 2 + 4) / 6)
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(per_token, mask, "constant")
    # ratio 1: loss = -sum of valid advantages / (2 sequences x 3 tokens)
    adv = t([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    loss, _ = ppo_policy_loss(torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), adv,
                              mask, 0.2, aggregation="constant", normalizer=6.0)
    assert loss.item() == pytest.approx(-(1 + 1 - 2) / 6)


def test_dr_grpo_advantages_only_subtract_the_group_mean():
    adv = grpo_advantages(t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3, scale_by_std=False)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])


def test_sequence_level_logprobs_give_the_geometric_mean_ratio():
    logp = t([[0.1, 0.3, 9.0], [0.5, 0.5, 0.5]]).requires_grad_()
    old = t([[0.0, 0.0, 0.0], [0.2, 0.2, 0.2]])
    mask = t([[1, 1, 0], [0, 0, 0]])
    out = sequence_level_logprobs(logp, old, mask)
    assert torch.exp(out - old)[0].tolist() == pytest.approx([math.exp(0.2)] * 3)
    assert torch.exp(out - old)[1].tolist() == pytest.approx([1.0] * 3)  # no valid token
    out[0, 2].backward()
    assert logp.grad[0].tolist() == pytest.approx([0.5, 0.5, 0.0])  # masked token: no say


def test_gspo_clips_the_whole_sequence_on_its_mean_ratio():
    """Token ratios 1.5 and 1 (each within clip for the second): the sequence ratio
    sqrt(1.5) = 1.2247 is above 1 + 0.2, so with A > 0 every token is clipped (no gradient),
    and with A < 0 the unclipped ratio counts, with gradient s / 2 on each valid token."""
    old = torch.zeros(1, 3, dtype=F64)
    mask = t([[1, 1, 0]])
    s = math.sqrt(1.5)
    for advantage, loss_value, grad in ((1.0, -1.2, [0.0, 0.0, 0.0]),
                                        (-1.0, s, [s / 2, s / 2, 0.0])):
        logp = t([[math.log(1.5), 0.0, 0.0]]).requires_grad_()
        loss, clip_ratio = ppo_policy_loss(sequence_level_logprobs(logp, old, mask), old,
                                           t([advantage]), mask, 0.2,
                                           aggregation="sequence")
        loss.backward()
        assert loss.item() == pytest.approx(loss_value)
        assert logp.grad[0].tolist() == pytest.approx(grad)
        assert clip_ratio.item() == (1.0 if advantage > 0 else 0.0)


# ------------------------------------------------------------------- parity with TRL 1.16


class _Accelerator:
    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x


def _trl_grpo_loss(token_logps, old, ref, completion_mask, advantages, *, loss_type: str,
                   level: str, beta: float, eps_low: float, eps_high: float, max_len: int):
    """TRL's GRPOTrainer._compute_loss with the model's log-probs given."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    rows, width = token_logps.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (
        token_logps, torch.zeros(rows, width), None)
    trainer.top_entropy_quantile, trainer.off_policy_mask_threshold = 1.0, None
    trainer.importance_sampling_level, trainer.loss_type, trainer.beta = level, loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = eps_low, eps_high
    trainer.args = SimpleNamespace(use_bias_correction_kl=False, delta=None)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = False, False
    trainer.model = SimpleNamespace(training=True)
    trainer.current_gradient_accumulation_steps, trainer.max_completion_length = 1, max_len
    trainer._entropy_bonus_enabled, trainer.aux_loss_enabled = False, False
    trainer.accelerator = _Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
              "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
              "completion_ids": torch.zeros(rows, width, dtype=torch.long),
              "completion_mask": completion_mask, "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    return trainer._compute_loss(None, inputs)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose forward returns given logits (on the CPU, as a model's would)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the batch a device to go to
        self.logits = logits

    def forward(self, **inputs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize(("loss_type", "level", "aggregation"), [
    ("dr_grpo", "token", "constant"),
    ("grpo", "sequence", "sequence"),
    ("dr_grpo", "sequence", "constant"),
], ids=["dr_grpo", "gspo", "dr_grpo+sequence"])
def test_ppo_objective_matches_trl_grpo_loss_and_gradient(loss_type, level, aggregation):
    """Our worker objective on a stand-in model against TRL's loss on the same log-probs:
    loss and gradient with respect to the logits, KL term (k3, beta 0.04) included."""
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(11)
    rows, prompt, completion, vocab, max_len = 6, 2, 5, 7, 6
    logits = torch.randn(rows, prompt + completion, vocab, generator=gen)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    completion_mask = (torch.arange(completion)[None, :] < lengths[:, None]).long()
    ids = torch.randint(0, vocab, (rows, prompt + completion), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, prompt:] = ids[:, prompt:].masked_fill(completion_mask == 0, -100)
    shifted_mask = (labels[:, 1:] != -100).float()
    # old and reference log-probs near the current ones, so some ratios clip and some do not
    current = gather_logprobs(logits[:, :-1], labels[:, 1:])
    row_shift = 0.3 * torch.randn(rows, 1, generator=gen)  # moves whole sequences' ratios
    old = (current + row_shift + 0.3 * torch.randn(current.shape, generator=gen)) * shifted_mask
    ref = (current + 0.3 * torch.randn(current.shape, generator=gen)) * shifted_mask
    advantages = grpo_advantages(torch.randn(rows, generator=gen), group_size=3)

    ours_logits = logits.clone().requires_grad_()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "old_logprobs": old, "ref_logprobs": ref,
             "advantages": advantages[:, None] * shifted_mask}
    normalizer = float(rows * max_len) if aggregation == "constant" else float(rows)
    loss, metrics = ppo_objective(
        FixedLogits(ours_logits), batch, temperature=1.0,
        clip_eps=0.2, clip_eps_high=0.28, dual_clip=None, aggregation=aggregation,
        normalizer=normalizer, kl_coef=0.04, kl_estimator="k3", entropy_coef=0.0,
        importance_sampling_level=level)
    loss.backward()

    trl_logits = logits.clone().requires_grad_()
    trl_logps = gather_logprobs(trl_logits[:, :-1], labels[:, 1:])[:, prompt - 1:]
    trl_loss = _trl_grpo_loss(trl_logps, old[:, prompt - 1:], ref[:, prompt - 1:],
                              completion_mask, advantages, loss_type=loss_type, level=level,
                              beta=0.04, eps_low=0.2, eps_high=0.28, max_len=max_len)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-5)
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, atol=1e-6, rtol=1e-5)
    assert ours_logits.grad.abs().sum() > 1e-3  # not a comparison of zeros
    assert 0 < metrics["clip_ratio_sum"] < metrics["tokens"]  # some ratios were clipped


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_without_old_logprobs_the_forward_is_its_own_old_policy_as_in_trl(level):
    """One update per rollout: a batch without `old_logprobs` takes this forward's own,
    detached (ratio 1), as TRL's GRPO does with one iteration; loss and gradient match TRL's
    and ours given those log-probs as old. The gap to the engine's log-probs comes back."""
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(5)
    rows, prompt, completion, vocab, max_len = 4, 2, 4, 7, 4
    logits = torch.randn(rows, prompt + completion, vocab, generator=gen)
    completion_mask = (torch.arange(completion)[None, :]
                       < torch.tensor([4, 2, 1, 3])[:, None]).long()
    ids = torch.randint(0, vocab, (rows, prompt + completion), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, prompt:] = ids[:, prompt:].masked_fill(completion_mask == 0, -100)
    shifted_mask = (labels[:, 1:] != -100).float()
    current = gather_logprobs(logits[:, :-1], labels[:, 1:]) * shifted_mask
    ref = (current + 0.3 * torch.randn(current.shape, generator=gen)) * shifted_mask
    engine = current + 0.01 * torch.randn(current.shape, generator=gen)
    advantages = grpo_advantages(torch.randn(rows, generator=gen), group_size=2)
    base = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "ref_logprobs": ref, "advantages": advantages[:, None] * shifted_mask}
    kwargs = dict(temperature=1.0, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                  aggregation="sequence", normalizer=float(rows), kl_coef=0.04,
                  kl_estimator="k3", entropy_coef=0.0, importance_sampling_level=level)

    def ours(batch):
        leaf = logits.clone().requires_grad_()
        loss, metrics = ppo_objective(FixedLogits(leaf), batch, **kwargs)
        loss.backward()
        return loss, leaf.grad, metrics

    loss, grad, metrics = ours({**base, "engine_logprobs": engine})
    given_loss, given_grad, given = ours({**base, "old_logprobs": current.detach()})
    trl_logits = logits.clone().requires_grad_()
    trl_logps = gather_logprobs(trl_logits[:, :-1], labels[:, 1:])[:, prompt - 1:]
    trl_loss = _trl_grpo_loss(trl_logps, None, ref[:, prompt - 1:], completion_mask,
                              advantages, loss_type="grpo", level=level, beta=0.04,
                              eps_low=0.2, eps_high=0.2, max_len=max_len)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6, rel=1e-5)
    torch.testing.assert_close(grad, trl_logits.grad, atol=1e-6, rtol=1e-5)
    assert loss.item() == pytest.approx(given_loss.item(), abs=1e-7)
    torch.testing.assert_close(grad, given_grad)
    assert grad.abs().sum() > 1e-3
    assert metrics["ratio_sum"] == pytest.approx(metrics["tokens"])
    gap = (engine - current).abs() * shifted_mask
    assert metrics["logprob_gap_sum"] == pytest.approx(float(gap.sum()), rel=1e-5)
    assert metrics["max_logprob_gap"] == pytest.approx(float(gap.max()), rel=1e-5)
    assert "logprob_gap_sum" not in given  # old log-probs given: the trainer measured the gap

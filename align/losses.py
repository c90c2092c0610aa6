"""Loss functions as pure functions of tensors.

Nothing here imports from the project; trainers call these and do no maths inline.
Shapes: B = batch (sequences), T = tokens, V = vocabulary. Labels use -100 for positions that
carry no loss (prompt tokens, padding), as Hugging Face does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM outputs with their targets: position t predicts token t+1.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken.

    Returns:
        logits (B, T-1, V) and labels (B, T-1).
    """
    return logits[:, :-1, :], labels[:, 1:]


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token; 0 where the label is IGNORE_INDEX.

    Args:
        logits: (B, T, V), already aligned with labels (see shift_for_next_token).
        labels: (B, T) target ids or IGNORE_INDEX.

    Returns:
        (B, T) float tensor of log p(label) (0 at ignored positions).
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    # log_softmax in float32: bf16 log-probs lose the precision ratios and KL terms need.
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, safe.unsqueeze(-1)).squeeze(-1) * mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor,
             num_tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over unmasked tokens and divided by `num_tokens`.

    Passing the token count of the whole global batch (all ranks, all micro-batches) makes the
    gradient independent of how the batch was split, which is what keeps 1-worker and N-worker
    runs on the same loss curve.

    Args:
        logits: (B, T, V) raw model outputs (not shifted).
        labels: (B, T) input ids with IGNORE_INDEX on positions that carry no loss.
        num_tokens: divisor; defaults to this batch's unmasked target count.

    Returns:
        Scalar loss.
    """
    logits, labels = shift_for_next_token(logits, labels)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_tokens is None:
        num_tokens = float((labels != IGNORE_INDEX).sum().clamp(min=1))
    return total / num_tokens


# ---------------------------------------------------------------------------------------------
# Reductions shared by the losses below
# ---------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is non-zero; 0 where the mask is empty.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as `x`, 0/1 (bool or float).
        dim: dimension to reduce; None reduces over every element.

    Returns:
        Scalar if `dim` is None, else `x` with `dim` removed (e.g. (B,) for dim=-1).
    """
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1e-8), torch.zeros_like(total))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
               normalizer: float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; see ppo_policy_loss for the two modes.

    With `normalizer`, the sum (of tokens, or of per-sequence means) is divided by it instead
    of by this batch's own count: pass the count of the whole global batch so the gradient does
    not depend on how that batch was split over workers and micro-batches.
    """
    if aggregation == "token":
        if normalizer is not None:
            return (per_token * mask.to(per_token.dtype)).sum() / normalizer
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        per_seq = masked_mean(per_token, mask, dim=-1)
        has_tokens = mask.sum(-1) > 0  # a sequence with no valid token must not pull the mean to 0
        if normalizer is not None:
            return (per_seq * has_tokens.to(per_seq.dtype)).sum() / normalizer
        return masked_mean(per_seq, has_tokens)
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


def aggregation_normalizer(mask: torch.Tensor, aggregation: str) -> float:
    """The `normalizer` of `aggregate` for a whole (global) batch with valid-token `mask`.

    "token": its valid-token count; "sequence": its sequences with at least one valid token,
    the same ones `aggregate` averages over without a normalizer. At least 1, so a batch with
    nothing valid gives loss 0 rather than 0 / 0.

    Args:
        mask: (B, T) 1 on valid tokens of every sequence of the batch.
        aggregation: "token" or "sequence".
    """
    if aggregation == "token":
        count = mask.sum()
    elif aggregation == "sequence":
        count = (mask.sum(-1) > 0).sum()
    else:
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    return max(float(count), 1.0)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Log-probability of each sequence: the sum (or per-token mean) over its valid tokens.

    Args:
        token_logps: (B, T) per-token log-probs (e.g. from gather_logprobs).
        mask: (B, T) 1 on completion tokens, 0 on prompt and padding.
        average: divide by the number of valid tokens (SimPO, IPO-style length normalisation).

    Returns:
        (B,) summed or averaged log-probs; 0 for a row with no valid token.
    """
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax over the last dimension, computed in float32.

    Args:
        logits: (..., V), e.g. (B, T, V).

    Returns:
        (...), e.g. (B, T).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------
# Preference losses: reward model (Bradley-Terry) and the DPO family
# ---------------------------------------------------------------------------------------------

class PreferenceLossOutput(NamedTuple):
    """Per-pair losses plus the implicit rewards a trainer logs (both detached rewards)."""

    losses: torch.Tensor  # (B,) loss per pair; the trainer takes the mean
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                  margin: torch.Tensor | float | None = None,
                  center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss, as TRL's RewardTrainer computes it.

    loss = mean(-logsigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2).
    The second term (TRL's `center_rewards_coefficient`, Eisenstein et al. 2023) keeps rewards
    centred on zero, which the pairwise term alone leaves free.

    Args:
        chosen_rewards: (B,) scalar scores of the preferred completions.
        rejected_rewards: (B,) scores of the other completions.
        margin: (B,) or scalar minimum preferred gap per pair; None for no margin.
        center_coef: weight of the centring term; 0 disables it.

    Returns:
        Scalar loss.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def preference_metrics(chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reward metrics TRL's DPOTrainer logs, as detached 0-d tensors (reduce across ranks).

    Args:
        chosen_rewards: (B,) rewards of the chosen completions (implicit or from a reward model).
        rejected_rewards: (B,) rewards of the rejected completions.

    Returns:
        {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}, each the
        batch mean; accuracy counts a tie as wrong, as TRL does.
    """
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
    }


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> PreferenceLossOutput:
    """DPO and its reference-based variants on summed sequence log-probs.

    With h = (pi_c - ref_c) - (pi_r - ref_r):
      - "sigmoid" (DPO): -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h); ls > 0 is
        conservative DPO (cDPO). TRL 1.16's `sigmoid` ignores label_smoothing; this is the formula
        TRL used before 1.0 and still uses in CPOTrainer and in the per-pair term of its `aot`.
      - "ipo": (h_avg - 1 / (2 * beta))^2, where h_avg divides each log-ratio by its completion
        length, as TRL 1.16 does (its authors' normalised form); pass lengths of ones for the
        paper's unnormalised form.
      - "hinge" (SLiC): relu(1 - beta * h).

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) same for the rejected completions.
        ref_chosen_logps: (B,) chosen log-probs under the frozen reference.
        ref_rejected_logps: (B,) rejected log-probs under the reference.
        beta: inverse temperature (for IPO, the regulariser tau).
        loss_type: one of "sigmoid", "ipo", "hinge".
        label_smoothing: probability that a label is flipped, in [0, 0.5); sigmoid only.
        chosen_lengths: (B,) completion token counts of the chosen side; required for "ipo".
        rejected_lengths: (B,) same for the rejected side.

    Returns:
        PreferenceLossOutput: losses (B,), and chosen/rejected rewards beta * (pi - ref) (B,),
        detached, on the summed log-probs for every loss type (as TRL logs them).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    _check_label_smoothing(label_smoothing)
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = _smoothed_logistic(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths "
                             "(completion token counts) to length-normalise the log-ratios as TRL "
                             "does; pass ones for the unnormalised form")
        h_avg = (chosen_ratio / chosen_lengths.clamp(min=1)
                 - rejected_ratio / rejected_lengths.clamp(min=1))
        losses = (h_avg - 1 / (2 * beta)) ** 2
    return PreferenceLossOutput(losses, beta * chosen_ratio.detach(),
                                beta * rejected_ratio.detach())


def simpo_loss(chosen_logps_avg: torch.Tensor, rejected_logps_avg: torch.Tensor, beta: float,
               gamma: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin.

    loss = -(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z), z = beta * (avg_c - avg_r) - gamma,
    identical to TRL's CPOTrainer with loss_type="simpo" (which writes gamma / beta inside).

    Args:
        chosen_logps_avg: (B,) per-token mean log-prob of each chosen completion
            (sequence_logps(..., average=True)).
        rejected_logps_avg: (B,) same for the rejected completions.
        beta: reward scale (the paper uses 2-10).
        gamma: target reward margin, in reward units (the paper uses 0.5-1.5).
        label_smoothing: probability that a label is flipped, in [0, 0.5).

    Returns:
        PreferenceLossOutput: losses (B,), rewards beta * avg log-prob (B,), detached.
    """
    _check_label_smoothing(label_smoothing)
    z = beta * (chosen_logps_avg - rejected_logps_avg) - gamma
    return PreferenceLossOutput(_smoothed_logistic(z, label_smoothing),
                                beta * chosen_logps_avg.detach(),
                                beta * rejected_logps_avg.detach())


def nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor,
             aggregation: str = "token") -> torch.Tensor:
    """Length-normalised NLL of the chosen completions: the RPO term added to DPO.

    The trainer weights it (`nll_coef`) and adds it to the preference loss. "token" divides the
    summed NLL by the batch's chosen token count (TRL 1.16's `sft` loss type); "sequence"
    averages each sequence's per-token NLL.

    Args:
        chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        chosen_lengths: (B,) their completion token counts.
        aggregation: "token" or "sequence".

    Returns:
        Scalar loss.
    """
    lengths = chosen_lengths.to(chosen_logps.dtype)
    if aggregation == "token":
        return -chosen_logps.sum() / lengths.sum().clamp(min=1)
    if aggregation == "sequence":
        return (-chosen_logps / lengths.clamp(min=1)).mean()
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


class PreferenceLogps(NamedTuple):
    """What every preference loss reads: summed completion log-probs and token counts."""

    chosen: torch.Tensor  # (B,) summed log-probs of the chosen completions under the policy
    rejected: torch.Tensor  # (B,) same for the rejected completions
    chosen_lengths: torch.Tensor  # (B,) chosen completion token counts
    rejected_lengths: torch.Tensor  # (B,) rejected completion token counts
    ref_chosen: torch.Tensor | None = None  # (B,) under the reference (reference-based losses)
    ref_rejected: torch.Tensor | None = None  # (B,)


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of PREFERENCE_LOSSES: how to compute it and what it needs."""

    compute: Callable[..., PreferenceLossOutput]  # (logps, beta, gamma, label_smoothing)
    needs_reference: bool  # reads ref_chosen / ref_rejected
    data: str  # "paired": {prompt, chosen, rejected} rows
    label_smoothing: bool  # accepts label_smoothing > 0


def _reference_based(loss_type: str, logps: PreferenceLogps, beta: float, gamma: float,
                     label_smoothing: float) -> PreferenceLossOutput:
    return dpo_loss(logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected, beta,
                    loss_type, label_smoothing, logps.chosen_lengths, logps.rejected_lengths)


def _length_normalised(logps: PreferenceLogps, beta: float, gamma: float,
                       label_smoothing: float) -> PreferenceLossOutput:
    return simpo_loss(logps.chosen / logps.chosen_lengths.clamp(min=1),
                      logps.rejected / logps.rejected_lengths.clamp(min=1), beta, gamma,
                      label_smoothing)


# loss_type -> PreferenceLoss; `dpo.loss_type` names a key of this table.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(partial(_reference_based, "sigmoid"), True, "paired", True),
    "ipo": PreferenceLoss(partial(_reference_based, "ipo"), True, "paired", False),
    "hinge": PreferenceLoss(partial(_reference_based, "hinge"), True, "paired", False),
    "simpo": PreferenceLoss(_length_normalised, False, "paired", True),
}


def preference_loss(loss_type: str, logps: PreferenceLogps, beta: float, gamma: float = 0.5,
                    label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """The preference loss `loss_type` (a key of PREFERENCE_LOSSES) on one batch of pairs.

    Args:
        loss_type: "sigmoid", "ipo", "hinge" (dpo_loss) or "simpo" (simpo_loss on per-token
            mean log-probs).
        logps: log-probs and lengths; the reference fields are needed unless the entry's
            `needs_reference` is False.
        beta, gamma, label_smoothing: as in dpo_loss / simpo_loss.

    Returns:
        PreferenceLossOutput (B,) losses and detached implicit rewards.
    """
    entry = PREFERENCE_LOSSES.get(loss_type)
    if entry is None:
        raise ValueError(f"loss_type must be one of {sorted(PREFERENCE_LOSSES)}, "
                         f"got {loss_type!r}")
    if entry.needs_reference and (logps.ref_chosen is None or logps.ref_rejected is None):
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs")
    return entry.compute(logps, beta, gamma, label_smoothing)


def rpo_nll_share(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor,
                  num_chosen_tokens: float) -> torch.Tensor:
    """This batch's share of the global-batch NLL of chosen completions (the RPO term).

    nll_loss is the batch's token mean; rescaled by its share of the `num_chosen_tokens` chosen
    tokens of the whole global batch, the shares of all micro-batches and ranks add up to the
    global token mean, however the batch is split.

    Args:
        chosen_logps: (B,) summed chosen log-probs.
        chosen_lengths: (B,) chosen token counts.
        num_chosen_tokens: chosen tokens in the whole global batch.
    """
    return nll_loss(chosen_logps, chosen_lengths) * (chosen_lengths.sum() / num_chosen_tokens)


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z): logistic loss with flipped-label noise."""
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------

def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps_low: float,
                    clip_eps_high: float | None = None, dual_clip: float | None = None,
                    aggregation: str = "token", normalizer: float | None = None,
                    token_weights: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate, with asymmetric (DAPO clip-higher) and dual clipping.

    Per token, r = exp(logprobs - old_logprobs) and
    loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A); with dual_clip = c > 1, tokens
    with A < 0 are further bounded: loss = min(loss, -c * A) (Ye et al. 2020, as OpenRLHF).

    Aggregation (how per-token losses become one number):
      - "token": sum over every valid token of the batch / number of valid tokens. Long answers
        weigh more; a token's weight does not depend on its sequence's length (DAPO; TRL GRPO's
        `dapo` loss type; OpenRLHF's token-level loss).
      - "sequence": mean over sequences of each sequence's per-token mean (the original GRPO).
        Sequences with no valid token are left out.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy.
        old_logprobs: (B, T) the same under the policy that sampled them (detached).
        advantages: (B, T), or (B,) for one advantage per sequence, broadcast over tokens.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        clip_eps_low: lower clip range, r >= 1 - clip_eps_low.
        clip_eps_high: upper clip range, r <= 1 + clip_eps_high; None means clip_eps_low.
        dual_clip: c > 1 bounding the loss of negative-advantage tokens; None disables it.
        aggregation: "token" or "sequence" (above).
        normalizer: divide the summed loss by this (`aggregation_normalizer` of the global
            batch) instead of by this batch's own count.
        token_weights: (B, T) detached per-token factors of the loss, e.g. the truncated
            importance weights of `truncated_importance_weights`; None: 1.

    Returns:
        (loss, clip_ratio): scalar loss, and the fraction of valid tokens whose loss is a clip
        bound, the PPO clip or the dual clip, so no gradient flows through their ratio
        (detached; a ratio exactly at a bound counts as not clipped).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be greater than 1, got {dual_clip}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_eps_low, 1 + high) * advantages
    objective = torch.min(surr1, surr2)
    clipped = surr2 < surr1
    if dual_clip is not None:
        dual = (advantages < 0) & (dual_clip * advantages > objective)
        objective = torch.where(dual, dual_clip * advantages, objective)
        clipped = clipped | dual
    if token_weights is not None:
        objective = objective * token_weights.detach()
    loss = aggregate(-objective, mask, aggregation, normalizer)
    clip_ratio = masked_mean(clipped.to(ratio.dtype), mask).detach()
    return loss, clip_ratio


def truncated_importance_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights for rollouts sampled by another engine.

    The PPO ratio is taken against the trainer's own old log-probs; the tokens were sampled by
    the rollout engine, whose numerics differ slightly. Weighting each token's loss by
    min(pi_old(y) / mu(y), cap), with mu the engine's sampling probability, corrects for that
    mismatch with bounded variance (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; veRL's `tis_imp_ratio_cap`).

    Args:
        old_logprobs: (B, T) trainer log-probs of the sampled tokens at rollout time.
        behaviour_logprobs: (B, T) the engine's log-probs of the same tokens.
        cap: upper bound of the weights (>= 1).

    Returns:
        (B, T) detached weights in (0, cap].
    """
    return torch.exp(old_logprobs - behaviour_logprobs).clamp(max=cap).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_eps: float | None = None,
                   aggregation: str = "token",
                   normalizer: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic loss 0.5 * max((v - R)^2, (v_clipped - R)^2), as OpenRLHF and TRL's old PPOTrainer.

    v_clipped = old_v + clip(v - old_v, -clip_eps, clip_eps) keeps the critic close to the
    values it had when the rollout was made; with clip_eps None the loss is 0.5 * (v - R)^2.

    Args:
        values: (B, T) current critic values of the response tokens.
        old_values: (B, T) critic values at rollout time (detached).
        returns: (B, T) targets (e.g. from compute_gae).
        mask: (B, T) 1 on response tokens.
        clip_eps: value clip range, None for no clipping.
        aggregation: "token" or "sequence", as in ppo_policy_loss.
        normalizer: as in ppo_policy_loss.

    Returns:
        (loss, clip_ratio): scalar loss, and the fraction of valid tokens where the clipped error
        was the larger one (detached; 0 without clipping).
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token, clipped_larger = unclipped, torch.zeros_like(unclipped)
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.max(unclipped, clipped)
        clipped_larger = (clipped > unclipped).to(values.dtype)
    loss = 0.5 * aggregate(per_token, mask, aggregation, normalizer)
    return loss, masked_mean(clipped_larger, mask).detach()

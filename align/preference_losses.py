"""Preference losses as pure functions of tensors: Bradley-Terry, the DPO family, KTO, ORPO.

Nothing here imports from the project (`align.losses` re-exports every public name). Inputs
are per-sequence log-probs: the sum (or per-token mean) of a completion's token log-probs.
Shapes: B = pairs (paired losses) or rows (KTO's unpaired rows).

`PREFERENCE_LOSSES` is the table `dpo.loss_type` names a key of: each entry says how to compute
the loss, whether it reads a reference model's log-probs, and which rows it trains on
("paired": `{prompt, chosen, rejected}`; "unpaired": `{prompt, completion, label}`, KTO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLossOutput(NamedTuple):
    """Per-pair (or per-row) losses plus the implicit rewards a trainer logs (detached)."""

    losses: torch.Tensor  # (B,) loss per pair; the trainer takes the mean
    chosen_rewards: torch.Tensor  # (B,) detached (KTO: one per desirable row)
    rejected_rewards: torch.Tensor  # (B,) detached (KTO: one per undesirable row)


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


# Above this per-token mean log-prob, log(1 - p) is taken at the bound: a completion the model
# is certain of (mean log-prob exactly 0 in float32) would otherwise give -inf and NaN gradients.
ORPO_MAX_AVG_LOGP = -1e-6


def orpo_loss(chosen_logps_avg: torch.Tensor, rejected_logps_avg: torch.Tensor,
              beta: float) -> PreferenceLossOutput:
    """ORPO's odds-ratio term (Hong et al. 2024), reference-free, as TRL's ORPOTrainer.

    With p = exp(mean token log-prob) of a completion and odds(p) = p / (1 - p):
    loss = -beta * logsigmoid(log odds(p_c) - log odds(p_r)), where
    log odds(p) = avg_logp - log(1 - exp(avg_logp)). The full ORPO objective adds the NLL of
    the chosen completions with weight 1 (`PreferenceLoss.includes_nll`); beta is the paper's
    lambda. Mean log-probs above ORPO_MAX_AVG_LOGP are clamped to it inside log(1 - p) only.

    Args:
        chosen_logps_avg: (B,) per-token mean log-prob of each chosen completion.
        rejected_logps_avg: (B,) same for the rejected completions.
        beta: weight of the odds-ratio term (TRL's default 0.1).

    Returns:
        PreferenceLossOutput: losses (B,), rewards beta * avg log-prob (B,), detached (TRL's).
    """
    chosen, rejected = chosen_logps_avg.float(), rejected_logps_avg.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return PreferenceLossOutput(-beta * F.logsigmoid(log_odds), beta * chosen.detach(),
                                beta * rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's `log1mexp`)."""
    x = x.clamp(max=ORPO_MAX_AVG_LOGP)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def kto_kl_baseline(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch's KL estimate, detached and clamped at 0 (as TRL).

    z0 = max(0, mean_i(log pi(y'_i | x_i) - log ref(y'_i | x_i))) over mismatched pairs: the
    completion y'_i of another row of the batch after prompt x_i (TRL rotates completions by
    one within the batch). No gradient flows through it.

    Args:
        kl_logps: (B,) summed log-probs of the mismatched completions under the policy.
        ref_kl_logps: (B,) the same under the reference.

    Returns:
        0-d tensor.
    """
    return (kl_logps - ref_kl_logps).float().mean().detach().clamp(min=0)


def kto_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             kl: torch.Tensor | float, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> PreferenceLossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired rows, as TRL's KTOTrainer.

    With r = log pi(y|x) - log ref(y|x) and the batch's reference point z0 (kto_kl_baseline):
    a desirable row loses desirable_weight * (1 - sigmoid(beta * (r - z0))), an undesirable
    row undesirable_weight * (1 - sigmoid(beta * (z0 - r))). The trainer averages over rows.

    Args:
        chosen_logps: (Bd,) summed log-probs of the desirable rows' completions (policy).
        rejected_logps: (Bu,) same for the undesirable rows.
        ref_chosen_logps: (Bd,) desirable rows under the reference.
        ref_rejected_logps: (Bu,) undesirable rows under the reference.
        kl: the reference point z0 (0-d tensor or float, no gradient).
        beta: inverse temperature.
        desirable_weight: weight of a desirable row's loss (lambda_D).
        undesirable_weight: weight of an undesirable row's loss (lambda_U).

    Returns:
        PreferenceLossOutput: losses (Bd + Bu,), desirable rows first; rewards beta * r,
        detached, (Bd,) and (Bu,).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratio))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return PreferenceLossOutput(losses, beta * chosen_ratio.detach(),
                                beta * rejected_ratio.detach())


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
    """What every preference loss reads: summed completion log-probs and token counts.

    For unpaired rows (KTO) "chosen" are the desirable rows and "rejected" the undesirable
    ones; the two sides may then differ in size.
    """

    chosen: torch.Tensor  # (B,) summed log-probs of the chosen completions under the policy
    rejected: torch.Tensor  # (B,) same for the rejected completions
    chosen_lengths: torch.Tensor  # (B,) chosen completion token counts
    rejected_lengths: torch.Tensor  # (B,) rejected completion token counts
    ref_chosen: torch.Tensor | None = None  # (B,) under the reference (reference-based losses)
    ref_rejected: torch.Tensor | None = None  # (B,)
    kl: torch.Tensor | None = None  # KTO: the batch's reference point z0 (kto_kl_baseline)


class PreferenceParams(NamedTuple):
    """The hyper-parameters a preference loss may read (each entry uses its own)."""

    beta: float  # inverse temperature / reward scale (ipo: tau; orpo: lambda)
    gamma: float = 0.5  # simpo: target reward margin
    label_smoothing: float = 0.0  # sigmoid, simpo: chance a label is flipped
    desirable_weight: float = 1.0  # kto: weight of desirable rows
    undesirable_weight: float = 1.0  # kto: weight of undesirable rows


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of PREFERENCE_LOSSES: how to compute it and what it needs."""

    compute: Callable[[PreferenceLogps, PreferenceParams], PreferenceLossOutput]
    needs_reference: bool  # reads ref_chosen / ref_rejected
    data: str  # "paired": {prompt, chosen, rejected}; "unpaired": {prompt, completion, label}
    label_smoothing: bool  # accepts label_smoothing > 0
    includes_nll: bool = False  # the loss adds the NLL of chosen itself, weight 1 (ORPO)


def _reference_based(loss_type: str, logps: PreferenceLogps,
                     p: PreferenceParams) -> PreferenceLossOutput:
    return dpo_loss(logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected, p.beta,
                    loss_type, p.label_smoothing, logps.chosen_lengths, logps.rejected_lengths)


def _averages(logps: PreferenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return (logps.chosen / logps.chosen_lengths.clamp(min=1),
            logps.rejected / logps.rejected_lengths.clamp(min=1))


def _simpo(logps: PreferenceLogps, p: PreferenceParams) -> PreferenceLossOutput:
    return simpo_loss(*_averages(logps), p.beta, p.gamma, p.label_smoothing)


def _orpo(logps: PreferenceLogps, p: PreferenceParams) -> PreferenceLossOutput:
    return orpo_loss(*_averages(logps), p.beta)


def _kto(logps: PreferenceLogps, p: PreferenceParams) -> PreferenceLossOutput:
    if logps.kl is None:
        raise ValueError("loss_type='kto' needs the batch's KL baseline (kto_kl_baseline)")
    return kto_loss(logps.chosen, logps.rejected, logps.ref_chosen, logps.ref_rejected,
                    logps.kl, p.beta, p.desirable_weight, p.undesirable_weight)


# loss_type -> PreferenceLoss; `dpo.loss_type` names a key of this table.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(partial(_reference_based, "sigmoid"), True, "paired", True),
    "ipo": PreferenceLoss(partial(_reference_based, "ipo"), True, "paired", False),
    "hinge": PreferenceLoss(partial(_reference_based, "hinge"), True, "paired", False),
    "simpo": PreferenceLoss(_simpo, False, "paired", True),
    "orpo": PreferenceLoss(_orpo, False, "paired", False, includes_nll=True),
    "kto": PreferenceLoss(_kto, True, "unpaired", False),
}


def preference_loss(loss_type: str, logps: PreferenceLogps, beta: float, gamma: float = 0.5,
                    label_smoothing: float = 0.0, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0) -> PreferenceLossOutput:
    """The preference loss `loss_type` (a key of PREFERENCE_LOSSES) on one batch.

    Args:
        loss_type: "sigmoid", "ipo", "hinge" (dpo_loss), "simpo" (simpo_loss) and "orpo"
            (orpo_loss) on per-token mean log-probs, or "kto" (kto_loss, unpaired rows).
        logps: log-probs and lengths; the reference fields are needed unless the entry's
            `needs_reference` is False, and `kl` for "kto".
        beta, gamma, label_smoothing: as in dpo_loss / simpo_loss.
        desirable_weight, undesirable_weight: as in kto_loss.

    Returns:
        PreferenceLossOutput: (B,) losses and detached implicit rewards.
    """
    entry = PREFERENCE_LOSSES.get(loss_type)
    if entry is None:
        raise ValueError(f"loss_type must be one of {sorted(PREFERENCE_LOSSES)}, "
                         f"got {loss_type!r}")
    if entry.needs_reference and (logps.ref_chosen is None or logps.ref_rejected is None):
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs")
    params = PreferenceParams(beta, gamma, label_smoothing, desirable_weight, undesirable_weight)
    return entry.compute(logps, params)


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

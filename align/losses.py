"""Loss functions as pure functions of tensors.

Nothing here imports from the project but `align.preference_losses` (the reward-model and
DPO-family losses, KTO and ORPO, re-exported here); trainers call these and do no maths inline.
Shapes: B = batch (sequences), T = tokens, V = vocabulary. Labels use -100 for positions that
carry no loss (prompt tokens, padding), as Hugging Face does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.preference_losses import (  # noqa: F401 (re-exported: align.losses is the entry point)
    DPO_LOSS_TYPES,
    PREFERENCE_LOSSES,
    PreferenceLogps,
    PreferenceLoss,
    PreferenceLossOutput,
    PreferenceParams,
    dpo_loss,
    kto_kl_baseline,
    kto_loss,
    nll_loss,
    orpo_loss,
    pairwise_loss,
    preference_loss,
    preference_metrics,
    rpo_nll_share,
    simpo_loss,
)

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


def sft_loss_from_logprobs(token_logps: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """`sft_loss` from the log-probs of the target tokens: their negated sum / `num_tokens`.

    Args:
        token_logps: (B, T-1) log p(next token), 0 where no loss is taken.
        num_tokens: divisor, the token count of the whole global batch (see `sft_loss`).

    Returns:
        Scalar loss.
    """
    return -token_logps.sum() / num_tokens


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


AGGREGATIONS = ("token", "sequence", "constant")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
               normalizer: float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; see ppo_policy_loss for the three modes.

    With `normalizer`, the sum (of tokens, or of per-sequence means) is divided by it instead
    of by this batch's own count: pass the count of the whole global batch so the gradient does
    not depend on how that batch was split over workers and micro-batches. "constant" always
    divides the token sum by `normalizer` (Dr. GRPO: sequences x the generation budget).
    """
    if aggregation == "constant":
        if normalizer is None:
            raise ValueError("aggregation 'constant' needs a normalizer (e.g. sequences x "
                             "max_new_tokens)")
        return (per_token * mask.to(per_token.dtype)).sum() / normalizer
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
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def aggregation_normalizer(mask: torch.Tensor, aggregation: str,
                           max_new_tokens: int | None = None) -> float:
    """The `normalizer` of `aggregate` for a whole (global) batch with valid-token `mask`.

    "token": its valid-token count; "sequence": its sequences with at least one valid token,
    the same ones `aggregate` averages over without a normalizer; "constant" (Dr. GRPO): its
    sequences x `max_new_tokens`, whatever their lengths. At least 1, so a batch with nothing
    valid gives loss 0 rather than 0 / 0.

    Args:
        mask: (B, T) 1 on valid tokens of every sequence of the batch.
        aggregation: "token", "sequence" or "constant".
        max_new_tokens: the generation budget; required for "constant".
    """
    if aggregation == "token":
        count = float(mask.sum())
    elif aggregation == "sequence":
        count = float((mask.sum(-1) > 0).sum())
    elif aggregation == "constant":
        if max_new_tokens is None:
            raise ValueError("aggregation 'constant' needs max_new_tokens")
        count = float(mask.size(0) * max_new_tokens)
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
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
# PPO
# ---------------------------------------------------------------------------------------------

def sequence_level_logprobs(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """Log-probs whose ratio to `old_logprobs` is GSPO's sequence-level importance ratio.

    GSPO (Zheng et al. 2025) replaces each token's ratio by its sequence's
    s_i = exp(mean over valid tokens of (logprobs - old_logprobs)), the geometric mean of the
    token ratios, so one ratio (and one clipping decision) covers the whole sequence. Passing
    old_logprobs + that mean as `logprobs` to ppo_policy_loss gives exactly that ratio on every
    token; its gradient is s_i * mean_t grad log pi_t, as in TRL's
    importance_sampling_level="sequence".

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy.
        old_logprobs: (B, T) the same under the sampling policy (detached).
        mask: (B, T) 1 on response tokens.

    Returns:
        (B, T): old_logprobs + the row's mean log-ratio (a row with no valid token: its
        old_logprobs, ratio 1).
    """
    mean_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1)
    return old_logprobs + mean_log_ratio.unsqueeze(-1)


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
      - "constant": sum over every valid token / `normalizer`, a constant such as sequences x
        max_new_tokens (Dr. GRPO; TRL GRPO's `dr_grpo`), so neither the batch's nor a
        sequence's length rescales a token's gradient.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy.
        old_logprobs: (B, T) the same under the policy that sampled them (detached).
        advantages: (B, T), or (B,) for one advantage per sequence, broadcast over tokens.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        clip_eps_low: lower clip range, r >= 1 - clip_eps_low.
        clip_eps_high: upper clip range, r <= 1 + clip_eps_high; None means clip_eps_low.
        dual_clip: c > 1 bounding the loss of negative-advantage tokens; None disables it.
        aggregation: "token", "sequence" or "constant" (above).
        normalizer: divide the summed loss by this (`aggregation_normalizer` of the global
            batch) instead of by this batch's own count; required for "constant".
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

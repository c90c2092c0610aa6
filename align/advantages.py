"""Advantage estimators and KL penalties for online RL, as pure functions of tensors.

Nothing here imports from the project. Shapes: B = sequences (samples), T = response tokens.
`mask` is (B, T) with 1 on valid response tokens and 0 on padding (or on tokens that are not the
policy's own, such as tool output); outputs are 0 where the mask is 0.

Group estimators (GRPO, RLOO) expect the samples of one prompt to be contiguous: rows
[g * group_size, (g + 1) * group_size) form group g.

Advantages are targets, not part of the graph: every estimator runs under torch.no_grad().
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
# veRL's clamps for k3 (its low_var_kl): the log-ratio before exp, and the estimate itself.
K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens.

    With d = logprobs - ref_logprobs (Schulman, "Approximating KL divergence", 2020):
      - "k1": d. Unbiased, can be negative per token.
      - "k2": d^2 / 2. Biased, low variance, >= 0.
      - "k3": exp(-d) - 1 + d, i.e. exp(ref - logp) - (ref - logp) - 1. Unbiased, >= 0; the one
        GRPO adds to its loss (TRL, OpenRLHF). Clamped as veRL's low_var_kl: -d to [-20, 20]
        before the exp (float32 exp overflows past 88) and the estimate to at most 10, so one
        token the policy made far less likely than the reference cannot make the loss infinite;
        a clamped token passes no gradient.

    Which estimator gives the gradient of a KL depends on where the estimate goes: see
    `kl_estimator_problem`.

    Positions where both inputs are 0 (masked by gather_logprobs) give 0 for every estimator.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy.
        ref_logprobs: (B, T) the same under the reference.
        estimator: "k1", "k2" or "k3".

    Returns:
        (B, T) per-token KL estimate; differentiable with respect to `logprobs`.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        neg = (-d).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        return (torch.exp(neg) - 1 - neg).clamp(max=K3_VALUE_CLAMP)
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def default_kl_estimator(kl_in_reward: bool) -> str:
    """The estimator whose expected gradient regularises towards the reference where the KL
    goes: k1 as a reward penalty (OpenRLHF's default), k3 as a loss term (GRPO, TRL)."""
    return "k1" if kl_in_reward else "k3"


def kl_placement(estimator: str, kl_in_reward: bool | None,
                 kl_estimator: str | None) -> tuple[bool, str]:
    """(kl_in_reward, kl_estimator) with their None defaults resolved: the KL is a reward
    penalty for the estimators that take per-token rewards (gae, reinforce_pp) and a loss term
    otherwise, estimated with k1 in the reward and k3 in the loss (`default_kl_estimator`).

    Args:
        estimator: the advantage estimator (algorithm.estimator).
        kl_in_reward: algorithm.kl_in_reward; None: by the estimator.
        kl_estimator: algorithm.kl_estimator; None: the default for where the KL goes.
    """
    in_reward = kl_in_reward if kl_in_reward is not None else estimator in TOKEN_REWARD_ESTIMATORS
    return in_reward, kl_estimator or default_kl_estimator(in_reward)


def kl_estimator_problem(estimator: str, kl_in_reward: bool) -> str | None:
    """Why `estimator` does not give the gradient of a KL where it goes; None when it does.

    On-policy, with p = pi(y), r = ref(y), d = log p - log r, and g = grad log p:
      - as a detached reward penalty k, the policy gradient is E_p[k(d) g]. For k1 that is
        E_p[d g] = grad KL(pi||ref) exactly. For k3 it is grad KL(pi||ref) - grad KL(ref||pi):
        the two cancel near the reference and the sign flips far from it. For k2 it is second
        order in d, so it vanishes near the reference.
      - as a loss term k(d) (differentiated through log p only), the gradient is E_p[k'(d) g].
        k1: E_p[g] = 0, no regularisation at all. k2: E_p[d g] = grad KL(pi||ref) exactly.
        k3: E_p[(1 - r / p) g] = grad KL(ref||pi), the reverse KL, also minimal at pi = ref.
    tests/test_advantages.py checks these on an exact softmax.
    """
    if kl_in_reward and estimator in ("k2", "k3"):
        return (f"as a reward penalty the expected gradient of {estimator} is not that of a KL "
                + ("(it is grad KL(pi||ref) - grad KL(ref||pi): near-cancelling close to the "
                   "reference, raising the KL far from it)" if estimator == "k3" else
                   "(it is second order in the log-ratio: almost no pull near the reference)")
                + "; use k1, whose expected gradient is exactly grad KL(pi||ref)")
    if not kl_in_reward and estimator == "k1":
        return ("as a loss term the expected gradient of k1 is 0 (E_pi[grad log pi]): it does "
                "not regularise; use k3 (GRPO's: the gradient of KL(ref||pi)) or k2 (exactly "
                "grad KL(pi||ref))")
    return None


@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to zero mean and unit variance over its valid positions.

    (x - mean) / sqrt(var + eps), statistics over every valid element of the whole tensor; with
    shift_mean False the mean is added back (only the scale changes), as TRL's masked_whiten.
    `unbiased` uses Bessel's correction (TRL); False is the population variance (OpenRLHF).

    Args:
        x: (B, T) values, e.g. advantages.
        mask: (B, T) 1 on valid positions.
        shift_mean: subtract the mean (True) or keep it (False).
        unbiased: divide the squared deviations by n - 1 rather than n.
        eps: added to the variance.

    Returns:
        (B, T) whitened values, 0 where the mask is 0 (all 0 when the mask is empty).
    """
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    denom = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum() / denom
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


@torch.no_grad()
def token_level_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                        kl_coef: float = 0.0) -> torch.Tensor:
    """Spread sequence scores over tokens for PPO / REINFORCE++: the score on the last valid
    token of each row, minus kl_coef * kl on every valid token (OpenRLHF's compute_reward).

    Args:
        scores: (B,) one reward per sequence.
        mask: (B, T) 1 on valid response tokens.
        kl: (B, T) per-token KL estimate (kl_penalty), or None.
        kl_coef: weight of the KL penalty.

    Returns:
        (B, T) token rewards, 0 where the mask is 0 (a row with no valid token gets nothing).
    """
    mask = mask.to(scores.dtype)
    positions = torch.arange(mask.size(1), device=mask.device)
    last = (mask * positions).argmax(dim=-1)  # index of the last valid token
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(mask.size(0), device=mask.device), last] = scores
    if kl is not None:
        rewards = rewards - kl_coef * kl
    return rewards * mask


@torch.no_grad()
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the valid tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t; A_t = delta_t + gamma * lam * A_{t+1}; R_t = A_t + V_t.
    The value after the last valid token is 0 (the response ended). Masked positions are skipped:
    the recursion links each valid token to the next valid one, so rewards and values there are
    ignored (identical to OpenRLHF's loop for right-padded rows).

    Args:
        rewards: (B, T) token-level rewards (e.g. token_level_rewards).
        values: (B, T) critic values of the response tokens.
        mask: (B, T) 1 on valid response tokens.
        gamma: discount factor.
        lam: GAE lambda (1 gives Monte-Carlo returns minus values, 0 the one-step TD error).

    Returns:
        (advantages, returns), each (B, T), 0 where the mask is 0.
    """
    valid = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid[:, t], adv, 0.0)
        next_adv = torch.where(valid[:, t], adv, next_adv)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
    returns = (advantages + values) * valid
    return advantages, returns


def _check_groups(batch: int, group_size: int) -> None:
    if group_size < 1 or batch % group_size:
        raise ValueError(f"batch of {batch} rewards is not a whole number of groups of "
                         f"group_size={group_size}: each prompt needs exactly group_size "
                         "contiguous samples")


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages (GRPO, Shao et al. 2024), as TRL's GRPOTrainer.

    A_i = (r_i - mean_group) / (std_group + eps), std with Bessel's correction (n - 1), as
    TRL's nanstd. scale_by_std False only subtracts the mean (Dr. GRPO; TRL scale_rewards="none").
    A group of one sample gets advantage 0.

    Args:
        rewards: (B,) one scalar reward per sample, B = n_prompts * group_size.
        group_size: samples per prompt.
        scale_by_std: divide by the group's standard deviation.
        eps: added to the std so identical rewards give 0 rather than 0 / 0.

    Returns:
        (B,) advantages, one per sequence (broadcast over its tokens by ppo_policy_loss).
    """
    _check_groups(rewards.numel(), group_size)
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        if group_size > 1:
            std = grouped.std(dim=1, keepdim=True)
        else:
            std = torch.zeros_like(grouped)
        advantages = advantages / (std + eps)
    return advantages.view(-1)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's baseline is the mean reward
    of the other samples of its prompt, A_i = r_i - (sum_group - r_i) / (group_size - 1).

    Args:
        rewards: (B,) one scalar reward per sample, B = n_prompts * group_size.
        group_size: samples per prompt, at least 2.

    Returns:
        (B,) advantages, one per sequence.
    """
    _check_groups(rewards.numel(), group_size)
    if group_size < 2:
        raise ValueError("rloo_advantages needs group_size >= 2: the leave-one-out baseline of a "
                         "single sample is undefined")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


@torch.no_grad()
def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor,
                         gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go G_t = sum_{k >= t} gamma^(k - t) r_k over the valid tokens.

    Masked positions are skipped (their rewards ignored), as in compute_gae.

    Args:
        rewards: (B, T) token-level rewards (e.g. token_level_rewards, KL penalty included).
        mask: (B, T) 1 on valid response tokens.
        gamma: discount factor.

    Returns:
        (B, T) returns, 0 where the mask is 0.
    """
    valid = mask.bool()
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid[:, t], running, 0.0)
    return returns


@torch.no_grad()
def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor,
                            gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, OpenRLHF): discounted returns whitened over the whole batch.

    The batch (all valid tokens of all sequences) is the baseline and the scale, with the
    population variance as OpenRLHF; call it on the global batch, or the statistics differ per
    rank.

    Args:
        rewards: (B, T) token-level rewards.
        mask: (B, T) 1 on valid response tokens.
        gamma: discount factor.

    Returns:
        (advantages, returns), each (B, T), 0 where the mask is 0.
    """
    returns = reinforce_pp_returns(rewards, mask, gamma)
    return whiten(returns, mask, shift_mean=True, unbiased=False), returns


ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
# Estimators that spread the score over tokens, so a per-token KL can enter the reward.
TOKEN_REWARD_ESTIMATORS = ("gae", "reinforce_pp")


@torch.no_grad()
def compute_advantages(estimator: str, scores: torch.Tensor, mask: torch.Tensor, *,
                       group_size: int = 1, kl: torch.Tensor | None = None,
                       kl_coef: float = 0.0, values: torch.Tensor | None = None,
                       gamma: float = 1.0, lam: float = 0.95, scale_by_std: bool = True,
                       whiten_advantages: bool = True, valid: torch.Tensor | None = None,
                       token_rewards: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages of one rollout buffer under `estimator`, the one dispatch trainers call.

    - "gae": token rewards (score on the last token, minus kl_coef * kl per token), then GAE
      against the critic's `values`, whitened over the batch when `whiten_advantages`.
    - "reinforce_pp": the same token rewards, discounted returns whitened over the batch.
    - "grpo" / "rloo": one advantage per sequence from `scores - kl_coef * kl.sum(-1)`,
      broadcast over its valid tokens.

    Args:
        estimator: one of ESTIMATORS.
        scores: (B,) one reward per sequence.
        mask: (B, T) 1 on valid response tokens.
        group_size: samples per prompt (grpo, rloo).
        kl: (B, T) per-token KL to put into the reward, or None when the KL is a loss term.
        kl_coef: weight of `kl`.
        values: (B, T) critic values; required for "gae".
        gamma: discount (gae, reinforce_pp).
        lam: GAE lambda.
        scale_by_std: grpo: divide by the group's standard deviation.
        whiten_advantages: gae: whiten the advantages over the batch.
        valid: (B,) bool, False for samples kept out of training (a multi-turn episode that
            failed for infrastructure reasons: its mask is all 0); grpo/rloo leave them out
            of their group's baseline. None: all valid.
        token_rewards: (B, T) per-turn rewards of multi-turn episodes on the last token of
            their turn. gae/reinforce_pp add them to the token rewards (credit flows back over
            the model's tokens only, across the environment's masked gaps); grpo/rloo add
            their sum to the sequence's score (the episode's advantage is broadcast).

    Returns:
        (advantages (B, T), returns (B, T) for "gae" else None), 0 where the mask is 0.
    """
    if estimator in TOKEN_REWARD_ESTIMATORS:
        rewards = token_level_rewards(scores, mask, kl, kl_coef)
        if token_rewards is not None:
            rewards = rewards + token_rewards * mask
        if estimator == "reinforce_pp":
            return reinforce_pp_advantages(rewards, mask, gamma)[0], None
        if values is None:
            raise ValueError("estimator 'gae' needs the critic's values")
        advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
        if whiten_advantages:
            advantages = whiten(advantages, mask)
        return advantages, returns
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if kl is not None:
        scores = scores - kl_coef * kl.sum(-1)
    if token_rewards is not None:
        scores = scores + (token_rewards * mask).sum(-1)
    if valid is not None and not bool(valid.all()):
        per_sequence = masked_group_advantages(estimator, scores, valid, group_size,
                                               scale_by_std)
    else:
        per_sequence = (grpo_advantages(scores, group_size, scale_by_std)
                        if estimator == "grpo" else rloo_advantages(scores, group_size))
    return per_sequence[:, None] * mask, None


@torch.no_grad()
def masked_group_advantages(estimator: str, scores: torch.Tensor, valid: torch.Tensor,
                            group_size: int, scale_by_std: bool = True,
                            eps: float = 1e-4) -> torch.Tensor:
    """grpo_advantages / rloo_advantages over the valid samples of each group only: the
    others get 0 and are no part of the mean, the std or the leave-one-out baseline. A group
    with one valid sample gives it 0 (nothing to compare with).

    Args:
        estimator: "grpo" or "rloo".
        scores: (B,) rewards.
        valid: (B,) bool.
        group_size: samples per prompt.
    """
    _check_groups(scores.numel(), group_size)
    r = scores.view(-1, group_size)
    v = valid.view(-1, group_size).to(r.dtype)
    n = v.sum(dim=1, keepdim=True)
    total = (r * v).sum(dim=1, keepdim=True)
    if estimator == "rloo":
        adv = (r - (total - r) / (n - 1).clamp(min=1)) * (n > 1)
    else:
        mean = total / n.clamp(min=1)
        adv = r - mean
        if scale_by_std:
            var = (((r - mean) * v) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
            adv = adv / (var.sqrt() * (n > 1) + eps)
    return (adv * v).view(-1)

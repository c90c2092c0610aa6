"""Experience making for PPO-family training: what turns a scored rollout into what the update
trains on.

Per sample, into `rollout.tensors`: the old log-probs (the sampling policy's, as the trainer
computes them) and the reference's, whose per-token difference is the KL; the critic's values
(`estimator: gae`); advantages and returns (pure functions in align.advantages); and with
truncated importance sampling (`importance_cap`) the engine's own sampling log-probs.

One shortcut is decided here and nowhere else (`update_computes_old_logprobs`): with one
update per rollout, TRL's GRPO with one iteration, the update's own forward gives the old
log-probs, and the reference runs in the update's call on its micro-batches. That saves a
forward pass over the rollout, a call to the workers and a second collation of it each
iteration. The maker then skips those passes (`make`), asks the update to bring the reference
in (`update_kwargs`) and reads the KL and the engine gap from the update's sums
(`from_update`); callers take both paths' results alike.
"""

from __future__ import annotations

from typing import Any

import torch

from align.advantages import compute_advantages, kl_penalty, kl_placement
from align.config import PPOConfig
from align.rollout.verify import GAP_KEYS, logprob_gap
from align.trainers.batches import micro_batching
from align.trainers.kl_control import KLController
from align.trainers.ppo_objectives import response_mask, token_logprobs, token_values
from align.trainers.roles import Role
from align.trainers.rollout import Rollout, infer_rows

ASYNC_TIS_CAP = 2.0  # importance-weight cap with rollout.async_steps and no algorithm.tis_cap


def importance_cap(cfg: PPOConfig) -> float | None:
    """algorithm.tis_cap, or with async rollouts (sampled by an older policy) the default cap
    of decoupled PPO's behaviour-policy correction; None: no importance weights."""
    cap = cfg.algorithm.tis_cap
    return ASYNC_TIS_CAP if cap is None and cfg.rollout.async_steps else cap


def kl_settings(cfg: PPOConfig) -> tuple[bool, str]:
    """(kl_in_reward, kl_estimator) of the run, defaults resolved (`kl_placement`)."""
    alg = cfg.algorithm
    return kl_placement(alg.estimator, alg.kl_in_reward, alg.kl_estimator)


def update_computes_old_logprobs(cfg: PPOConfig) -> bool:
    """Whether the update's forward gives the old log-probs: one update per rollout (one
    epoch, one minibatch), the KL not in the reward (advantages do not wait for it), and no
    dropout. The update's forward is then the first on the rollout under the weights that made
    its experience, so the ratio is 1, as with a forward of its own."""
    alg, ro = cfg.algorithm, cfg.rollout
    kl_in_reward, _ = kl_settings(cfg)
    return (alg.ppo_epochs == 1 and not kl_in_reward and bool(cfg.model.disable_dropout)
            and ro.prompts_per_step * ro.n_samples_per_prompt <= cfg.trainer.global_batch_size)


class ExperienceMaker:
    """Old and reference log-probs, values, advantages and returns of each rollout."""

    def __init__(self, cfg: PPOConfig, kl: KLController) -> None:
        self.cfg, self.kl = cfg, kl
        self.kl_in_reward, self.kl_estimator = kl_settings(cfg)
        self.old_from_update = update_computes_old_logprobs(cfg)

    def make(self, rollout: Rollout, scores: torch.Tensor, policy: Role,
             critic: Role | None) -> dict[str, float]:
        """Fill `rollout.tensors` for the update.

        Returns the rollout's `kl` (mean per-sequence KL to the reference) and its engine gap
        (GAP_KEYS) where they are known now; {} where the update computes them (`from_update`).
        """
        cfg, alg = self.cfg, self.cfg.algorithm
        micro, temp = micro_batching(cfg.trainer, rollout.size_of), cfg.rollout.temperature
        chunk = cfg.trainer.logprob_chunk_size
        mask = response_mask(rollout.batch)
        tensors, known = {}, {}
        kl = None
        if not self.old_from_update:
            ref = infer_rows(policy.group, token_logprobs, rollout, micro, policy.packing,
                             reference=True, temperature=temp, logprob_chunk_size=chunk)
            old = infer_rows(policy.group, token_logprobs, rollout, micro, policy.packing,
                             temperature=temp, logprob_chunk_size=chunk)
            kl = kl_penalty(old, ref, self.kl_estimator) * mask
            tensors.update(ref_logprobs=ref, old_logprobs=old)
            known = {"kl": float(kl.sum(-1).mean()),
                     **logprob_gap(rollout.engine_logprobs, old, mask)}
        if importance_cap(cfg) is not None or (self.old_from_update
                                               and rollout.engine_logprobs is not None):
            tensors["engine_logprobs"] = rollout.engine_logprobs
        values = None
        if critic is not None:
            values = infer_rows(critic.group, token_values, rollout, micro, critic.packing) * mask
        adv, returns = compute_advantages(
            alg.estimator, scores, mask, group_size=cfg.rollout.n_samples_per_prompt,
            kl=kl if self.kl_in_reward else None, kl_coef=self.kl.coef, values=values,
            gamma=alg.gamma, lam=alg.lam, scale_by_std=alg.scale_by_std,
            whiten_advantages=alg.whiten_advantages,
            valid=None if rollout.valid is None else torch.tensor(rollout.valid),
            token_rewards=rollout.token_rewards)
        if values is not None:
            tensors.update(old_values=values, returns=returns)
        tensors["advantages"] = adv
        rollout.tensors = tensors
        return known

    def update_kwargs(self) -> dict[str, Any]:
        """What the policy's update call adds: the reference's log-probs, computed in the same
        call on the same micro-batches, where the update gives the old ones."""
        if not self.old_from_update:
            return {}
        return {"with_reference": ("ref_logprobs", token_logprobs,
                                   {"temperature": self.cfg.rollout.temperature,
                                    "logprob_chunk_size": self.cfg.trainer.logprob_chunk_size})}

    def from_update(self, rollout: Rollout, sums: dict[str, float]) -> dict[str, float]:
        """`kl` and the engine gap from the update's summed metrics, where the update computed
        the old log-probs (its one minibatch is the whole rollout, before any step); else {}."""
        if not self.old_from_update:
            return {}
        tokens = max(sums["tokens"], 1.0)
        stats = {"kl": sums["kl_sum"] / rollout.size}
        if "logprob_gap_sum" in sums:
            stats[GAP_KEYS[0]] = sums["logprob_gap_sum"] / tokens
            stats[GAP_KEYS[1]] = sums["max_logprob_gap"]
        return stats

"""PPO's update loop: `ppo_epochs` passes of minibatch steps over one rollout, policy then
critic.

Each pass visits the rollout in a fresh order drawn from (seed, iteration); each minibatch of
`trainer.global_batch_size` samples is one optimizer step of each role, split over its workers
and micro-batches (`align.trainers.dispatch`), its loss normalised by the whole minibatch
(`aggregation_normalizer`) so the step does not depend on the split. The objectives are
`ppo_objective` and `value_objective` (align.trainers.ppo_objectives); what they train on is
the rollout's experience (align.trainers.experience).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from align.config import PPOConfig
from align.losses import aggregation_normalizer
from align.metrics import accumulate
from align.trainers.batches import MicroBatching, micro_batching
from align.trainers.dispatch import StepResult, train_objective
from align.trainers.experience import importance_cap, kl_settings
from align.trainers.kl_control import KLController
from align.trainers.ppo_objectives import ppo_objective, response_mask, value_objective
from align.trainers.roles import Role
from align.trainers.rollout import Rollout


@dataclass
class UpdateResult:
    """An update's metrics, and the workers' metric sums they came from."""

    metrics: dict[str, float]
    sums: dict[str, float]


class PPOUpdate:
    """The minibatch steps of each iteration, with the KL coefficient `kl` holds at the time."""

    def __init__(self, cfg: PPOConfig, kl: KLController) -> None:
        self.cfg, self.kl = cfg, kl
        self.kl_in_reward, self.kl_estimator = kl_settings(cfg)

    def run(self, rollout: Rollout, step: int, policy: Role, critic: Role | None,
            **policy_extra: Any) -> UpdateResult:
        """Train on `rollout` (its experience in `rollout.tensors`) at 0-based iteration
        `step`; `policy_extra` goes to every policy step (see `Policy.train_step`)."""
        cfg, alg = self.cfg, self.cfg.algorithm
        batch_size = cfg.trainer.global_batch_size
        micro = micro_batching(cfg.trainer, rollout.size_of)
        rng = np.random.default_rng([cfg.trainer.seed, step])
        policy_kw = {**self._policy_settings(), **policy_extra}
        sums: dict[str, float] = {}
        minibatches = 0
        for _ in range(alg.ppo_epochs):
            order = rng.permutation(rollout.size).tolist()
            for start in range(0, rollout.size, batch_size):
                index = order[start:start + batch_size]
                normalizer = aggregation_normalizer(response_mask(rollout.rows(index)),
                                                    alg.loss_aggregation,
                                                    cfg.rollout.max_new_tokens)
                result = train_role(policy, ppo_objective, rollout, index, micro,
                                    normalizer=normalizer, **policy_kw)
                accumulate(sums, {**result.sums, "grad_norm": result.shared["grad_norm"]})
                if critic is not None:
                    result = train_role(critic, value_objective, rollout, index, micro,
                                        clip_eps=alg.value_clip_eps,
                                        aggregation=alg.loss_aggregation, normalizer=normalizer)
                    accumulate(sums, result.sums)
                minibatches += 1
        return UpdateResult(self._metrics(sums, minibatches, critic is not None), sums)

    def _policy_settings(self) -> dict[str, Any]:
        """`ppo_objective`'s settings this iteration."""
        cfg, alg = self.cfg, self.cfg.algorithm
        return dict(temperature=cfg.rollout.temperature, clip_eps=alg.clip_eps,
                    clip_eps_high=alg.clip_eps_high, dual_clip=alg.dual_clip,
                    aggregation=alg.loss_aggregation, kl_estimator=self.kl_estimator,
                    kl_coef=0.0 if self.kl_in_reward else self.kl.coef,
                    entropy_coef=alg.entropy_coef, tis_cap=importance_cap(cfg),
                    importance_sampling_level=alg.importance_sampling_level,
                    logprob_chunk_size=cfg.trainer.logprob_chunk_size)

    @staticmethod
    def _metrics(sums: dict[str, float], minibatches: int, critic: bool) -> dict[str, float]:
        tokens = max(sums["tokens"], 1.0)
        metrics = {"policy_loss": sums["policy_loss"] / minibatches,
                   "clip_ratio": sums["clip_ratio_sum"] / tokens,
                   "ratio": sums["ratio_sum"] / tokens,
                   "entropy": sums["entropy_sum"] / tokens,
                   "grad_norm": sums["grad_norm"] / minibatches}
        if critic:
            metrics["value_loss"] = sums["value_loss"] / minibatches
            metrics["value_clip_ratio"] = sums["value_clip_ratio_sum"] / tokens
        return metrics


def train_role(role: Role, objective: Any, rollout: Rollout, index: list[int],
               micro: MicroBatching, **kwargs: Any) -> StepResult:
    """One optimizer step of `role` on the rollout rows `index`, collated as it packs."""
    return train_objective(role.group, objective, index,
                           lambda mb: rollout.rows(mb, role.packing), micro, **kwargs)

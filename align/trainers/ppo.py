"""PPO and the critic-free estimators (GRPO, RLOO, REINFORCE++), as Ray actor groups.

Roles, each a Ray actor group (see OpenRLHF's split):
  - policy: trainable; generates with its current weights (ZeRO-3 weights gathered for it) and
    holds the frozen reference (with LoRA: its own weights with the adapter off; otherwise a
    frozen copy partitioned like it);
  - critic: a value model, for `estimator: gae` only;
  - rewards: the weighted reward list, called from the driver (trained reward models score on
    their own actor groups).
One iteration: sample prompts -> generate -> score (with `rollout.dynamic_sampling`, groups
whose rewards are all equal are dropped and more prompts sampled: `align.trainers.
dynamic_sampling`) -> old/reference log-probs and values -> advantages (pure functions in
align.advantages) -> `ppo_epochs` passes of minibatch updates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import ray
import torch

from align.advantages import TOKEN_REWARD_ESTIMATORS, compute_advantages, kl_penalty
from align.config import EMBEDDED, PPOConfig
from align.data import load_rows, tokenize_prompts
from align.distributed import PolicyWorker, WorkerGroup, ensure_ray
from align.distributed.group import node_cpus
from align.tasks import arithmetic
from align.trainers.base import Trainer
from align.trainers.batches import StepSchedule, shard, sum_metrics
from align.trainers.dynamic_sampling import ScoredRollout, sample_until_full
from align.trainers.evaluation import generate_ids
from align.trainers.kl_control import KLController
from align.trainers.ppo_objectives import (
    ppo_objective,
    response_mask,
    token_logprobs,
    token_values,
    value_objective,
)
from align.trainers.rollout import Rollout, completion_ids, generate_rollout, infer_rows


class PPOTrainer(Trainer):
    stage = "ppo"

    def __init__(self, cfg: PPOConfig, show_progress: bool = True) -> None:
        super().__init__(cfg, show_progress)
        alg = cfg.algorithm
        self.use_critic = alg.estimator == "gae"
        self.kl_in_reward = (alg.kl_in_reward if alg.kl_in_reward is not None
                             else alg.estimator in TOKEN_REWARD_ESTIMATORS)
        self.kl = KLController(alg.kl_coef, alg.adaptive_kl, alg.kl_target, alg.kl_horizon)

    # ---------------------------------------------------------------- set-up

    def prepare_data(self) -> int:
        from reward_models import CombinedReward

        cfg = self.cfg
        if cfg.data.train == EMBEDDED:
            rows, name = arithmetic.rl_rows(cfg.task, cfg.task.num_train), "embedded:arithmetic"
            eval_rows = arithmetic.eval_rows(cfg.task)
        else:
            rows, name = load_rows(cfg.data.train, cfg.data.split), cfg.data.train
            eval_rows = load_rows(cfg.data.eval, cfg.data.split) if cfg.data.eval else []
        self.prompts = tokenize_prompts(rows, self.tokenizer, cfg.data.max_length, name)
        if cfg.eval.max_samples:
            eval_rows = eval_rows[: cfg.eval.max_samples]
        self.eval_prompts = (tokenize_prompts(eval_rows, self.tokenizer, cfg.data.max_length,
                                              cfg.data.eval or name) if eval_rows else [])
        self.rewards = CombinedReward.from_specs([dataclasses.asdict(r) for r in cfg.rewards])
        self.gold = (CombinedReward.from_specs([dataclasses.asdict(r) for r in cfg.gold_rewards])
                     if cfg.gold_rewards else None)
        self.schedule = StepSchedule(len(self.prompts), cfg.rollout.prompts_per_step,
                                     cfg.trainer.seed)
        return len(self.prompts)

    def count_steps(self, num_examples: int) -> int:
        if self.cfg.trainer.max_steps > 0:
            return self.cfg.trainer.max_steps
        return max(1, int(self.schedule.steps_per_epoch * self.cfg.trainer.epochs))

    def buffer_size(self) -> int:
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.n_samples_per_prompt

    def optimizer_steps(self) -> int:
        per_iteration = self.buffer_size() // self.cfg.trainer.global_batch_size
        return self.total_steps * self.cfg.algorithm.ppo_epochs * per_iteration

    def samples_per_step(self) -> int:
        return self.buffer_size()

    def build_workers(self) -> WorkerGroup:
        cfg = self.cfg
        policy_dist, critic_dist = self._role_resources()
        self.group = WorkerGroup(PolicyWorker, policy_dist, role="policy")
        self.group.call("setup", cfg.model, cfg.trainer, policy_dist, self.optimizer_steps(),
                        "causal_lm", True, True)
        if self.use_critic:
            critic_model = dataclasses.replace(
                cfg.model, name_or_path=cfg.critic.name_or_path or cfg.model.name_or_path)
            critic_trainer = dataclasses.replace(cfg.trainer, lr=cfg.critic.lr)
            critic = WorkerGroup(PolicyWorker, critic_dist, role="critic")
            self.extra_groups["critic"] = critic
            critic.call("setup", critic_model, critic_trainer, critic_dist,
                        self.optimizer_steps(), "sequence_classification")
        return self.group

    def _role_resources(self):
        """Per-role DistributedConfigs. Unless set, roles share the free CPUs evenly in Ray's
        accounting, while each keeps threads for a whole node: the roles run one after
        another (generate, score, train), never at the same time."""
        cfg = self.cfg
        ensure_ray(cfg.distributed.ray_address)
        policy_n = cfg.distributed.num_workers
        critic_n = (cfg.critic.num_workers or policy_n) if self.use_critic else 0
        cpus = node_cpus()
        # Reward-model groups (started with the rewards) already hold their CPUs.
        free = min(ray.available_resources().get("CPU", cpus), cpus * len(ray.nodes()))
        share = free / (policy_n + critic_n)

        def role(n: int, cpus_per_worker: float | None, zero: int) -> Any:
            per = cpus_per_worker or cfg.distributed.cpus_per_worker or share
            threads = cfg.distributed.torch_threads or max(1, int(cpus // n))
            return dataclasses.replace(cfg.distributed, num_workers=n, cpus_per_worker=per,
                                       torch_threads=threads, zero_stage=zero)

        zero = cfg.distributed.zero_stage
        critic_zero = cfg.critic.zero_stage if cfg.critic.zero_stage is not None else zero
        return (role(policy_n, None, zero),
                role(critic_n or 1, cfg.critic.cpus_per_worker, critic_zero))

    def extra_state(self) -> dict[str, Any]:
        return self.kl.state()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl.load(state)

    # ---------------------------------------------------------------- one iteration

    def train_step(self, step: int) -> dict[str, float]:
        ro = self.cfg.rollout
        timing = {"time/generate": 0.0, "time/score": 0.0}
        if ro.dynamic_sampling:
            scored, metrics = sample_until_full(
                lambda round_: self._sample_round(step, round_, timing), ro.prompts_per_step,
                ro.n_samples_per_prompt, ro.max_resample_rounds, self.tokenizer.pad_token_id,
                multiple_of=self.group.size)
            if scored is None:  # every group sampled was all-equal: nothing to learn from
                return {**metrics, **timing}
        else:
            scored, metrics = self._sample_round(step, 0, timing), {}
        rollout, scores = scored.rollout, scored.scores
        t2 = time.perf_counter()
        kl = self._make_experience(rollout, torch.tensor(scores.total, dtype=torch.float32))
        t3 = time.perf_counter()
        metrics.update(self._update(rollout, step))
        t4 = time.perf_counter()
        metrics.update(self._rollout_metrics(rollout, scores, scored.gold, kl))
        metrics.update({**timing, "time/experience": t3 - t2, "time/train": t4 - t3})
        self.kl.update(metrics["kl"])
        return metrics

    def _sample_round(self, step: int, round_: int, timing: dict[str, float]) -> ScoredRollout:
        """Generate and score one round: the step's own prompts (round 0) or, for dynamic
        sampling, `prompts_per_step` more drawn by a seed of (seed, step, round)."""
        cfg, ro = self.cfg, self.cfg.rollout
        if round_ == 0:
            indices = self.schedule.indices(step)
        else:
            rng = np.random.default_rng([cfg.trainer.seed, step, round_])
            indices = rng.choice(len(self.prompts), ro.prompts_per_step, replace=False).tolist()
        t0 = time.perf_counter()
        rollout = generate_rollout(self.group, self.tokenizer, [self.prompts[i] for i in indices],
                                   ro.n_samples_per_prompt, ro.max_new_tokens, ro.temperature,
                                   ro.top_p,
                                   seed=cfg.trainer.seed * 1_000_003 + step + round_ * 7_919_993)
        t1 = time.perf_counter()
        # Token ids reach the rewards as TRL passes them (overlong_penalty counts them).
        columns = {"completion_ids": completion_ids(rollout), **rollout.columns}
        scores = self.rewards.score(rollout.prompts, rollout.completions, **columns)
        gold = (self.gold.score(rollout.prompts, rollout.completions, **columns)
                if self.gold else None)
        timing["time/generate"] += t1 - t0
        timing["time/score"] += time.perf_counter() - t1
        return ScoredRollout(rollout, scores, gold)

    def _make_experience(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor:
        """Old/reference log-probs, values, advantages and returns into `rollout.tensors`.

        Returns the per-token KL (N, T-1), zero outside completions.
        """
        cfg, alg = self.cfg, self.cfg.algorithm
        micro, temp = cfg.trainer.micro_batch_size, cfg.rollout.temperature
        old = infer_rows(self.group, token_logprobs, rollout, micro, temperature=temp)
        ref = infer_rows(self.group, token_logprobs, rollout, micro, reference=True,
                         temperature=temp)
        mask = response_mask(rollout.batch)
        kl = kl_penalty(old, ref, alg.kl_estimator) * mask
        tensors = {"old_logprobs": old, "ref_logprobs": ref}
        values = None
        if self.use_critic:
            values = infer_rows(self.extra_groups["critic"], token_values, rollout, micro) * mask
        adv, returns = compute_advantages(
            alg.estimator, scores, mask, group_size=cfg.rollout.n_samples_per_prompt,
            kl=kl if self.kl_in_reward else None, kl_coef=self.kl.coef, values=values,
            gamma=alg.gamma, lam=alg.lam, scale_by_std=alg.scale_by_std,
            whiten_advantages=alg.whiten_advantages)
        if values is not None:
            tensors.update(old_values=values, returns=returns)
        tensors["advantages"] = adv
        rollout.tensors = tensors
        return kl

    def _update(self, rollout: Rollout, step: int) -> dict[str, float]:
        """`ppo_epochs` passes of minibatch steps over the buffer, policy then critic."""
        cfg, alg = self.cfg, self.cfg.algorithm
        batch_size, micro = cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size
        rng = np.random.default_rng([cfg.trainer.seed, step])
        policy_kw = dict(temperature=cfg.rollout.temperature, clip_eps=alg.clip_eps,
                         clip_eps_high=alg.clip_eps_high, dual_clip=alg.dual_clip,
                         aggregation=alg.loss_aggregation, kl_estimator=alg.kl_estimator,
                         kl_coef=0.0 if self.kl_in_reward else self.kl.coef,
                         entropy_coef=alg.entropy_coef,
                         importance_sampling_level=alg.importance_sampling_level)
        sums: dict[str, float] = {}
        minibatches = 0
        for _ in range(alg.ppo_epochs):
            order = rng.permutation(rollout.size).tolist()
            for start in range(0, rollout.size, batch_size):
                index = order[start:start + batch_size]
                normalizer = self._loss_normalizer(rollout, index)
                results = self._train_role(self.group, ppo_objective, rollout, index, micro,
                                           normalizer=normalizer, **policy_kw)
                _add(sums, sum_metrics([r["sums"] for r in results]))
                _add(sums, {"grad_norm": results[0]["shared"]["grad_norm"]})
                if self.use_critic:
                    results = self._train_role(
                        self.extra_groups["critic"], value_objective, rollout, index, micro,
                        clip_eps=alg.value_clip_eps, aggregation=alg.loss_aggregation,
                        normalizer=normalizer)
                    _add(sums, sum_metrics([r["sums"] for r in results]))
                minibatches += 1
        tokens = max(sums["tokens"], 1.0)
        metrics = {"policy_loss": sums["policy_loss"] / minibatches,
                   "clip_ratio": sums["clip_ratio_sum"] / tokens,
                   "entropy": sums["entropy_sum"] / tokens,
                   "grad_norm": sums["grad_norm"] / minibatches}
        if self.use_critic:
            metrics["value_loss"] = sums["value_loss"] / minibatches
            metrics["value_clip_ratio"] = sums["value_clip_ratio_sum"] / tokens
        return metrics

    def _loss_normalizer(self, rollout: Rollout, index: list[int]) -> float:
        """What a minibatch's summed loss is divided by (see align.losses.aggregate): its
        response tokens ("token"), its sequences ("sequence"), or its sequences x the
        generation budget ("constant", Dr. GRPO)."""
        aggregation = self.cfg.algorithm.loss_aggregation
        if aggregation == "token":
            return float(response_mask(rollout.rows(index)).sum())
        if aggregation == "constant":
            return float(len(index) * self.cfg.rollout.max_new_tokens)
        return float(len(index))

    @staticmethod
    def _train_role(group: WorkerGroup, objective: Any, rollout: Rollout, index: list[int],
                    micro: int, **kwargs: Any) -> list[dict[str, Any]]:
        per_rank = shard(index, group.size, micro)
        batches = [[rollout.rows(mb) for mb in rank] for rank in per_rank]
        return group.call_each("train_step", [(objective, b) for b in batches], **kwargs)

    def _rollout_metrics(self, rollout: Rollout, scores: Any, gold: Any,
                         kl: torch.Tensor) -> dict[str, float]:
        stats = scores.metrics()
        metrics = {"reward": stats["reward/mean"], "reward_std": stats["reward/std"],
                   **{k: v for k, v in stats.items() if k.startswith("rewards/")
                      and k.endswith("/mean")},
                   "kl": float(kl.sum(-1).mean()), "kl_coef": self.kl.coef,
                   "completions/mean_length": float(np.mean(rollout.lengths)),
                   "completions/clipped_ratio": float(np.mean(rollout.truncated))}
        if gold is not None:
            metrics["reward/proxy"] = metrics["reward"]
            metrics["reward/gold"] = gold.metrics()["reward/mean"]
        return metrics

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, final: bool) -> dict[str, float]:
        """Greedy completions of held-out prompts: reward, gold reward, exact match."""
        if len(self.eval_prompts) < self.group.size:
            return {}
        cfg = self.cfg.eval
        prompts = [p.text for p in self.eval_prompts]
        ids = generate_ids(self.group, self.tokenizer, prompts, cfg.max_new_tokens,
                           cfg.batch_size)
        texts = [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        columns = {k: [p.columns.get(k) for p in self.eval_prompts]
                   for k in self.eval_prompts[0].columns}
        scored = {"completion_ids": ids, **columns}
        metrics = {"eval/reward": float(np.mean(self.rewards(prompts, texts, **scored)))}
        if self.gold is not None:
            metrics["eval/gold"] = float(np.mean(self.gold(prompts, texts, **scored)))
        answers = columns.get("answer")
        if answers and all(isinstance(a, str) for a in answers):
            metrics["eval/accuracy"] = arithmetic.accuracy(texts, answers)
        metrics["eval/samples"] = len(prompts)
        return metrics


def _add(total: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        total[key] = total.get(key, 0.0) + value


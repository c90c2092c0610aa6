"""PPO and the critic-free estimators (GRPO, RLOO, REINFORCE++), as Ray actor groups.

Roles, each a Ray actor group (see OpenRLHF's split):
  - policy: trainable; generates with its current weights (ZeRO-3 weights gathered for it) and
    holds the frozen reference (with LoRA: its own weights with the adapter off; otherwise a
    frozen copy partitioned like it);
  - critic: a value model, for `estimator: gae` only;
  - rewards: the weighted reward list, called from the driver (trained reward models score on
    their own actor groups).
One iteration, each step in a module of its own:
  1. scored rollouts: sample prompts -> generate -> score (dynamic sampling, the asynchronous
     pipeline; `align.trainers.rollout_producer`);
  2. experience: old/reference log-probs and values -> advantages (`align.trainers.experience`,
     pure functions in align.advantages);
  3. `ppo_epochs` passes of minibatch updates (`align.trainers.ppo_update`);
then the rollout engine gets the new weights. This module wires them together, and evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from align import sandbox
from align.config import EMBEDDED, PPOConfig
from align.distributed import PolicyWorker, WorkerGroup
from align.episodes.rewards import with_environment_reward
from align.episodes.submit import environment_spec
from align.rollout.factory import policy_gpu_share
from align.tasks import load_task
from align.trainers.base import Trainer
from align.trainers.batches import StepSchedule
from align.trainers.completion_logs import completion_rows
from align.trainers.dispatch import can_split
from align.trainers.evaluation import write_eval_samples
from align.trainers.experience import ExperienceMaker
from align.trainers.kl_control import KLController
from align.trainers.ppo_update import PPOUpdate
from align.trainers.roles import Role, role_resources
from align.trainers.rollout import Rollout
from align.trainers.rollout_producer import RolloutProducer
from align.trainers.stage_data import load_prompt_examples
from reward_models.builtin import exact_match


class PPOTrainer(Trainer[PPOConfig]):
    stage = "ppo"

    def __init__(self, cfg: PPOConfig, show_progress: bool = True) -> None:
        super().__init__(cfg, show_progress)
        alg = cfg.algorithm
        self.use_critic = alg.estimator == "gae"
        self.kl = KLController(alg.kl_coef, alg.adaptive_kl, alg.kl_target, alg.kl_horizon)
        self.experience = ExperienceMaker(cfg, self.kl)
        self.update = PPOUpdate(cfg, self.kl)
        self.rewards = self.gold = None  # loaded in prepare_data; released in close()
        self.rollouts: RolloutProducer | None = None  # built with the data
        self.policy: Role | None = None  # the trained roles, once their workers are up
        self.critic: Role | None = None  # `estimator: gae` only

    def fit(self) -> dict[str, Any]:
        try:
            return super().fit()
        finally:
            if self.rollouts is not None:
                self.rollouts.shutdown()

    # ---------------------------------------------------------------- set-up

    def prepare_data(self) -> int:
        from reward_models import CombinedReward

        cfg = self.cfg
        data = load_prompt_examples(cfg, self.tokenizer, self.show_progress)
        self.prompts, self.data_metrics = data.train, data.skip_metrics()
        self.eval_prompts = data.held_out[: cfg.eval.max_samples or None]
        # Held-out accuracy: the task's evaluator, or exact match with an `answer` column.
        self.task = load_task(cfg.task) if cfg.data.train == EMBEDDED else None
        sandbox.start_for_run(cfg)  # its settings checked now, before any actor starts
        self.rewards = with_environment_reward(
            [dataclasses.asdict(r) for r in cfg.rewards], environment_spec(cfg),
            cfg.environment.reward_weight)
        self.gold = (CombinedReward.from_specs([dataclasses.asdict(r) for r in cfg.gold_rewards])
                     if cfg.gold_rewards else None)
        self.schedule = StepSchedule(len(self.prompts), cfg.rollout.prompts_per_step,
                                     cfg.trainer.seed)
        self.rollouts = RolloutProducer(cfg, self.tokenizer, self.prompts, self.schedule,
                                        self.rewards, self.gold)
        return len(self.prompts)

    def close(self) -> None:
        """The actor groups, then the reward models' own actor groups."""
        try:
            super().close()
        finally:
            for rewards in (self.rewards, self.gold):
                if rewards is not None:
                    rewards.close()

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
        self.rollouts.reserve_engine()  # separate engines first: the roles share what is left
        policy_dist, critic_dist = role_resources(cfg, self.use_critic)
        self.group = WorkerGroup(PolicyWorker, policy_dist, role="policy",
                                 gpu_share=policy_gpu_share(cfg))
        self.group.call("setup", model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                        dist_cfg=policy_dist, total_steps=self.optimizer_steps(),
                        kind="causal_lm", trainable=True, reference=True)
        self.packing = self.packing_of(self.group, "policy")
        self.policy = Role(self.group, self.packing)
        self.rollouts.start(self.group, self.packing, self.total_steps)
        if self.use_critic:
            critic_model = dataclasses.replace(
                cfg.model, name_or_path=cfg.critic.name_or_path or cfg.model.name_or_path)
            critic_trainer = dataclasses.replace(cfg.trainer, lr=cfg.critic.lr)
            critic = WorkerGroup(PolicyWorker, critic_dist, role="critic")
            self.extra_groups["critic"] = critic
            critic.call("setup", model_cfg=critic_model, trainer_cfg=critic_trainer,
                        dist_cfg=critic_dist, total_steps=self.optimizer_steps(),
                        kind="sequence_classification")
            self.critic = Role(critic, self.packing_of(critic, "critic"))
        return self.group

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.kl.state()
        shaping = self.rewards.state()
        if shaping:
            state["reward_shaping"] = shaping
        pending = self.rollouts.state()
        if pending is not None:  # rollouts sampled with weights the checkpoint lacks
            state["async_rollouts"] = pending
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl.load(state)
        self.rewards.load(state.get("reward_shaping", {}))
        self.rollouts.load(state.get("async_rollouts", []))

    # ---------------------------------------------------------------- one iteration

    def train_step(self, step: int) -> dict[str, float]:
        scored, metrics, timing = self.rollouts.produce(step)
        self._skip_steps(int(metrics.get("rollout/skipped_minibatches", 0)))
        if scored is None:  # not one minibatch of varied groups: nothing to learn from
            return {**metrics, **timing}
        rollout, scores, gold = scored.rollout, scored.scores, scored.gold
        stale = any(scored.staleness or ())
        t2, train_start = time.perf_counter(), time.time()
        # The KL and the engine gap, checked as soon as they are known: before the update
        # where the experience holds the old log-probs, after it where the update made them.
        logprobs = self.rollouts.checked_gap(
            self.experience.make(rollout, torch.tensor(scores.total, dtype=torch.float32),
                                 self.policy, self.critic), step, stale)
        t3 = time.perf_counter()
        update = self.update.run(rollout, step, self.policy, self.critic,
                                 **self.experience.update_kwargs())
        t4 = time.perf_counter()
        logprobs.update(self.rollouts.checked_gap(
            self.experience.from_update(rollout, update.sums), step, stale))
        self.rollouts.sync_weights(timing, (train_start, time.time()))
        metrics.update(update.metrics)
        metrics["kl"] = logprobs.pop("kl")
        metrics.update(self._rollout_metrics(rollout, scores, gold))
        metrics.update(logprobs)  # the gap
        metrics.update({**timing, "time/experience": t3 - t2, "time/train": t4 - t3})
        every = self.cfg.trainer.log_completions_every
        if every and (step + 1) % every == 0:
            self.logger.log_completions(step + 1, completion_rows(rollout, scores, gold))
        self.kl.update(metrics["kl"], self.buffer_size())
        return metrics

    def _skip_steps(self, minibatches: int) -> None:
        """The LR schedules move on over the optimizer steps a short batch leaves out."""
        if minibatches:
            for group in (self.group, *self.extra_groups.values()):
                group.call("advance_schedule", minibatches * self.cfg.algorithm.ppo_epochs)

    def _rollout_metrics(self, rollout: Rollout, scores: Any, gold: Any) -> dict[str, float]:
        stats = scores.metrics()
        metrics = {"reward": stats["reward/mean"], "reward_std": stats["reward/std"],
                   **{k: v for k, v in stats.items() if k.startswith("rewards/")
                      and k.endswith("/mean")},
                   **scores.extra,  # shaped values, ensemble spread
                   **sandbox.take_metrics(),  # code run since the last step (code_tests, tools)
                   "kl_coef": self.kl.coef,
                   "completions/mean_length": float(np.mean(rollout.lengths)),
                   "completions/clipped_ratio": float(np.mean(rollout.truncated))}
        if gold is not None:
            metrics["reward/proxy"] = metrics["reward"]
            metrics["reward/gold"] = gold.metrics()["reward/mean"]
        return metrics

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, final: bool) -> dict[str, float]:
        """Greedy completions of held-out prompts: reward, gold reward, exact match."""
        if not can_split(self.group, len(self.eval_prompts)):
            return {}
        cfg = self.cfg.eval
        self.rollouts.sync_once()
        prompts, texts, columns = self.rollouts.held_out(self.eval_prompts, cfg.max_new_tokens,
                                                         cfg.batch_size)
        metrics = {"eval/reward": float(np.mean(self.rewards(prompts, texts, **columns)))}
        if self.gold is not None:
            metrics["eval/gold"] = float(np.mean(self.gold(prompts, texts, **columns)))
        answers = columns.get("answer")
        if answers and all(isinstance(a, str) for a in answers):
            judge = self.task.is_correct if self.task is not None else None
            correct = ([judge(t, a) for t, a in zip(texts, answers)] if judge else
                       [bool(v) for v in exact_match(prompts, texts, answer=answers)])
            metrics["eval/accuracy"] = float(np.mean(correct))
            if final:
                write_eval_samples(self.output_dir / "eval_samples.jsonl", prompts, answers,
                                   texts, correct)
        metrics["eval/samples"] = len(prompts)
        return metrics

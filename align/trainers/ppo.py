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

from align.advantages import compute_advantages, kl_penalty
from align.config import EMBEDDED, PPOConfig
from align.data.prompts import PromptExample, reward_columns
from align.data.tables import take
from align.distributed import PolicyWorker, WorkerGroup, ensure_ray
from align.distributed.group import node_cpus
from align.losses import aggregation_normalizer
from align.metrics import accumulate
from align.packed_forward import Packing
from align.reward_columns import COMPLETION_IDS_COLUMN
from align.rollout import Sampling
from align.rollout.eos import eos_token_ids
from align.rollout.factory import build_engine, policy_gpu_share, separate_engine
from align.rollout.verify import GAP_KEYS, check_logprob_gap, logprob_gap, max_logprob_diff
from align.tasks import load_task
from align.trainers.async_rollouts import RolloutPipeline
from align.trainers.base import Trainer
from align.trainers.batches import StepSchedule
from align.trainers.dispatch import StepResult, can_split, train_objective
from align.trainers.dynamic_sampling import ScoredRollout, sample_until_full
from align.trainers.evaluation import generate_ids, write_eval_samples
from align.trainers.kl_control import KLController
from align.trainers.ppo_objectives import (
    ppo_objective,
    response_mask,
    token_logprobs,
    token_values,
    value_objective,
)
from align.trainers.rollout import (
    Rollout,
    assemble_rollout,
    completion_ids,
    infer_rows,
    repeated_ids,
)
from align.trainers.stage_data import load_prompt_examples
from align.trainers.sync_probe import SyncProbe
from reward_models.builtin import exact_match
from reward_models.protocol import TRUNCATED_COLUMN

COMPLETIONS_LOGGED = 8  # samples per completions table


def completion_rows(rollout: Rollout, scores: Any, gold: Any) -> list[dict[str, Any]]:
    """The first samples of a rollout with their rewards, for a completions table."""
    rows = []
    for i in range(min(COMPLETIONS_LOGGED, rollout.size)):
        row = {"prompt": rollout.prompts[i], "completion": rollout.completions[i],
               "reward": scores.total[i]}
        row.update({f"rewards/{name}": values[i] for name, values in scores.per_reward.items()})
        if gold is not None:
            row["reward/gold"] = gold.total[i]
        rows.append(row)
    return rows


class PPOTrainer(Trainer[PPOConfig]):
    stage = "ppo"

    def __init__(self, cfg: PPOConfig, show_progress: bool = True) -> None:
        super().__init__(cfg, show_progress)
        alg = cfg.algorithm
        self.use_critic = alg.estimator == "gae"
        self.kl_in_reward, self.kl_estimator = alg.kl_placement()
        self.kl = KLController(alg.kl_coef, alg.adaptive_kl, alg.kl_target, alg.kl_horizon)
        self.rewards = self.gold = None  # loaded in prepare_data; released in close()
        self.critic_packing: Packing | None = None  # as `self.packing`, for the critic's model
        self.engine = None  # the rollout engine (align.rollout), started with the workers
        self.pipeline: RolloutPipeline | None = None  # rollout.async_steps >= 1
        self.sync_probe: SyncProbe | None = None  # with it: each version's sync is checked
        self.max_staleness = 0
        # One update per rollout, KL not in the reward, no dropout: the update's forward is
        # the first on the rollout under the weights that made its experience, so it gives
        # the old log-probs too (ratio 1, as TRL's GRPO with one iteration).
        self.old_from_update = (alg.ppo_epochs == 1 and not self.kl_in_reward
                                and bool(cfg.model.disable_dropout)
                                and self.buffer_size() <= cfg.trainer.global_batch_size)

    def fit(self) -> dict[str, Any]:
        try:
            return super().fit()
        finally:
            if self.engine is not None:
                self.engine.shutdown()

    # ---------------------------------------------------------------- set-up

    def prepare_data(self) -> int:
        from reward_models import CombinedReward

        cfg = self.cfg
        data = load_prompt_examples(cfg, self.tokenizer, self.show_progress)
        self.prompts, self.data_metrics = data.train, data.skip_metrics()
        self.eval_prompts = data.held_out[: cfg.eval.max_samples or None]
        # Held-out accuracy: the task's evaluator, or exact match with an `answer` column.
        self.task = load_task(cfg.task) if cfg.data.train == EMBEDDED else None
        self.rewards = CombinedReward.from_specs([dataclasses.asdict(r) for r in cfg.rewards])
        self.gold = (CombinedReward.from_specs([dataclasses.asdict(r) for r in cfg.gold_rewards])
                     if cfg.gold_rewards else None)
        self.schedule = StepSchedule(len(self.prompts), cfg.rollout.prompts_per_step,
                                     cfg.trainer.seed)
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
        # Separate engines reserve their resources before the roles share what is left.
        engine = build_engine(cfg, self.tokenizer, None) if separate_engine(cfg) else None
        self.engine = engine
        policy_dist, critic_dist = self._role_resources()
        self.group = WorkerGroup(PolicyWorker, policy_dist, role="policy",
                                 gpu_share=policy_gpu_share(cfg))
        self.group.call("setup", model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                        dist_cfg=policy_dist, total_steps=self.optimizer_steps(),
                        kind="causal_lm", trainable=True, reference=True)
        self.packing = self.packing_of(self.group, "policy")
        self._start_engine(engine)
        if self.use_critic:
            critic_model = dataclasses.replace(
                cfg.model, name_or_path=cfg.critic.name_or_path or cfg.model.name_or_path)
            critic_trainer = dataclasses.replace(cfg.trainer, lr=cfg.critic.lr)
            critic = WorkerGroup(PolicyWorker, critic_dist, role="critic")
            self.extra_groups["critic"] = critic
            critic.call("setup", model_cfg=critic_model, trainer_cfg=critic_trainer,
                        dist_cfg=critic_dist, total_steps=self.optimizer_steps(),
                        kind="sequence_classification")
            self.critic_packing = self.packing_of(critic, "critic")
        return self.group

    def _start_engine(self, engine: Any) -> None:
        """Bind (or start) the rollout engine and send it the initial weights."""
        cfg = self.cfg
        if engine is None:
            self.engine = build_engine(cfg, self.tokenizer, self.group)
        else:
            engine.bind(self.group)
        self.engine_synced = False  # first sync after a resume has loaded the weights
        self.eos_ids = eos_token_ids(cfg.model, self.tokenizer)
        on_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        self.max_logprob_diff = max_logprob_diff(cfg.rollout.vllm.max_logprob_diff,
                                                 cfg.model.dtype, on_gpu)
        if cfg.rollout.async_steps:
            self.pipeline = RolloutPipeline(self.engine, cfg.rollout.async_steps,
                                            cfg.rollout.timeout_s)
            self.sync_probe = SyncProbe(
                self.engine, self.group, self.tokenizer, self.eos_ids,
                cfg.trainer.micro_batch_size, self.packing, cfg.rollout.n_samples_per_prompt,
                rows=max(self.group.size, cfg.rollout.vllm.num_engines),
                limit=self.max_logprob_diff)

    def _sync_engine_once(self) -> None:
        if not self.engine_synced:
            self.engine.update_weights()
            self.engine_synced = True

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
        state: dict[str, Any] = self.kl.state()
        shaping = self.rewards.state()
        if shaping:
            state["reward_shaping"] = shaping
        if self.pipeline is not None:  # rollouts sampled with weights the checkpoint lacks
            state["async_rollouts"] = self.pipeline.state()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl.load(state)
        self.rewards.load(state.get("reward_shaping", {}))
        if self.pipeline is not None:
            self.pipeline.load(state.get("async_rollouts", []))

    # ---------------------------------------------------------------- one iteration

    def train_step(self, step: int) -> dict[str, float]:
        ro = self.cfg.rollout
        self._sync_engine_once()
        timing = {"time/generate": 0.0, "time/score": 0.0}
        if self.pipeline is not None:  # this version's weights, checked before they sample ahead
            timing.update(self.sync_probe.check(*self._request(step, 0), iteration=step + 1))
            self.pipeline.fill(step, self.total_steps, self._first_round)
        if ro.dynamic_sampling:
            scored, metrics = sample_until_full(
                lambda round_: self._sample_round(step, round_, timing), ro.prompts_per_step,
                ro.n_samples_per_prompt, ro.max_resample_rounds, self.tokenizer.pad_token_id,
                minibatch_size=self.cfg.trainer.global_batch_size)
            self._skip_steps(int(metrics["rollout/skipped_minibatches"]))
            if scored is None:  # not one minibatch of varied groups: nothing to learn from
                return {**metrics, **timing}
        else:
            scored, metrics = self._sample_round(step, 0, timing), {}
        self.engine.sleep()
        rollout, scores, gold = scored.rollout, scored.scores, scored.gold
        stale = any(scored.staleness or ())
        t2, train_start = time.perf_counter(), time.time()
        kl = self._make_experience(rollout, torch.tensor(scores.total, dtype=torch.float32))
        if kl is not None:
            gap = self._check_gap(logprob_gap(rollout.engine_logprobs,
                                              rollout.tensors["old_logprobs"],
                                              response_mask(rollout.batch)), step, stale)
        t3 = time.perf_counter()
        metrics.update(self._update(rollout, step))
        t4 = time.perf_counter()
        if kl is None:  # the update computed the old log-probs, the KL and the gap
            gap = self._check_gap({key: metrics.pop(key) for key in GAP_KEYS if key in metrics},
                                  step, stale)
        else:
            metrics["kl"] = float(kl.sum(-1).mean())
        if self.pipeline is not None:  # the engines finish what they generated meanwhile
            drained = self.pipeline.drain((train_start, time.time()))
            timing["time/wait"] += drained["time/wait"]
            timing["time/overlap"] = drained["time/overlap"]
        self.engine.wake()
        sync_seconds = self.engine.update_weights()
        metrics.update(self._rollout_metrics(rollout, scores, gold))
        metrics.update(gap)
        metrics.update({**timing, "time/experience": t3 - t2, "time/train": t4 - t3,
                        "time/weight_sync": sync_seconds})
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

    def _check_gap(self, gap: dict[str, float], step: int, stale: bool) -> dict[str, float]:
        """The rollout's gap to the trainer, checked; logged only as `rollout/stale_*` where
        samples came from an earlier version (it holds the updates since; the probe checked
        that version's sync)."""
        if stale:
            return {key.replace("rollout/", "rollout/stale_"): value for key, value in gap.items()}
        if gap:
            check_logprob_gap(gap, self.max_logprob_diff, self.engine.name, step + 1)
        return gap

    def _sample_round(self, step: int, round_: int, timing: dict[str, float]) -> ScoredRollout:
        """Generate and score one round: the step's own prompts (round 0) or, for dynamic
        sampling, `prompts_per_step` more drawn by a seed of (seed, step, round)."""
        ro = self.cfg.rollout
        examples, sampling = self._request(step, round_)
        t0, staleness = time.perf_counter(), 0
        if self.pipeline is not None and round_ == 0:  # sampled ahead, while earlier updates ran
            generation, staleness, waited = self.pipeline.take(step)
            self.max_staleness = max(self.max_staleness, staleness)
            timing.update({"rollout/staleness": staleness,
                           "rollout/staleness_max": self.max_staleness, "time/wait": waited})
        else:
            generation = self.engine.generate(repeated_ids(examples, ro.n_samples_per_prompt),
                                              sampling)
        rollout = assemble_rollout(self.tokenizer, examples, ro.n_samples_per_prompt,
                                   generation, self.eos_ids)
        t1 = time.perf_counter()
        # Token ids reach the rewards as TRL passes them (overlong_penalty counts them), and so
        # does which completions never ended (a reward model scores those without EOS).
        columns = {COMPLETION_IDS_COLUMN: completion_ids(rollout), **rollout.columns,
                   TRUNCATED_COLUMN: rollout.truncated}
        scores = self.rewards.score(rollout.prompts, rollout.completions, **columns)
        gold = (self.gold.score(rollout.prompts, rollout.completions, **columns)
                if self.gold else None)
        timing["time/generate"] += t1 - t0
        timing["time/score"] += time.perf_counter() - t1
        # Each round reports its own staleness: dynamic sampling's extra rounds are current.
        return ScoredRollout(rollout, scores, gold, (None if self.pipeline is None
                                                     else [staleness] * rollout.size))

    def _request(self, step: int, round_: int) -> tuple[list[PromptExample], Sampling]:
        """The prompts and sampling of a round: the step's own prompts (round 0) or, for
        dynamic sampling, `prompts_per_step` more drawn by a seed of (seed, step, round)."""
        cfg, ro = self.cfg, self.cfg.rollout
        if round_ == 0:
            indices = self.schedule.indices(step)
        else:
            rng = np.random.default_rng([cfg.trainer.seed, step, round_])
            indices = rng.choice(len(self.prompts), ro.prompts_per_step, replace=False).tolist()
        sampling = Sampling(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                            top_p=ro.top_p,
                            seed=cfg.trainer.seed * 1_000_003 + step + round_ * 7_919_993,
                            logprobs=True)
        return take(self.prompts, indices), sampling

    def _first_round(self, step: int) -> tuple[list[list[int]], Sampling]:
        examples, sampling = self._request(step, 0)
        return repeated_ids(examples, self.cfg.rollout.n_samples_per_prompt), sampling

    def _make_experience(self, rollout: Rollout, scores: torch.Tensor) -> torch.Tensor | None:
        """Old/reference log-probs, values, advantages and returns into `rollout.tensors`.

        Returns the per-token KL (N, T-1), zero outside completions; None when the update
        computes the old log-probs itself (`old_from_update`: TRL's shortcut for one update
        per rollout, which saves a forward pass over the rollout each iteration); the
        reference log-probs then come in the update's call too, on its own micro-batches,
        which saves a call to the workers and a second collation of the rollout.
        """
        cfg, alg = self.cfg, self.cfg.algorithm
        micro, temp = cfg.trainer.micro_batch_size, cfg.rollout.temperature
        mask = response_mask(rollout.batch)
        tensors = {}
        kl = None
        if not self.old_from_update:  # else the update's own call computes both (`_update`)
            ref = infer_rows(self.group, token_logprobs, rollout, micro, self.packing,
                             reference=True, temperature=temp)
            old = infer_rows(self.group, token_logprobs, rollout, micro, self.packing,
                             temperature=temp)
            kl = kl_penalty(old, ref, self.kl_estimator) * mask
            tensors.update(ref_logprobs=ref, old_logprobs=old)
        if cfg.importance_cap() is not None or (self.old_from_update
                                                and rollout.engine_logprobs is not None):
            tensors["engine_logprobs"] = rollout.engine_logprobs
        values = None
        if self.use_critic:
            values = infer_rows(self.extra_groups["critic"], token_values, rollout, micro,
                                self.critic_packing) * mask
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
                         aggregation=alg.loss_aggregation, kl_estimator=self.kl_estimator,
                         kl_coef=0.0 if self.kl_in_reward else self.kl.coef,
                         entropy_coef=alg.entropy_coef, tis_cap=cfg.importance_cap(),
                         importance_sampling_level=alg.importance_sampling_level)
        if self.old_from_update:  # the reference runs in the same call, on the same batches
            policy_kw["with_reference"] = ("ref_logprobs", token_logprobs,
                                           {"temperature": cfg.rollout.temperature})
        sums: dict[str, float] = {}
        minibatches = 0
        for _ in range(alg.ppo_epochs):
            order = rng.permutation(rollout.size).tolist()
            for start in range(0, rollout.size, batch_size):
                index = order[start:start + batch_size]
                normalizer = aggregation_normalizer(response_mask(rollout.rows(index)),
                                                    alg.loss_aggregation,
                                                    cfg.rollout.max_new_tokens)
                result = self._train_role(self.group, ppo_objective, rollout, index, micro,
                                          self.packing, normalizer=normalizer, **policy_kw)
                accumulate(sums, {**result.sums, "grad_norm": result.shared["grad_norm"]})
                if self.use_critic:
                    result = self._train_role(
                        self.extra_groups["critic"], value_objective, rollout, index, micro,
                        self.critic_packing, clip_eps=alg.value_clip_eps,
                        aggregation=alg.loss_aggregation, normalizer=normalizer)
                    accumulate(sums, result.sums)
                minibatches += 1
        tokens = max(sums["tokens"], 1.0)
        metrics = {"policy_loss": sums["policy_loss"] / minibatches,
                   "clip_ratio": sums["clip_ratio_sum"] / tokens,
                   "ratio": sums["ratio_sum"] / tokens,
                   "entropy": sums["entropy_sum"] / tokens,
                   "grad_norm": sums["grad_norm"] / minibatches}
        if self.old_from_update:  # one minibatch: the whole rollout before any update
            metrics["kl"] = sums["kl_sum"] / rollout.size
            if "logprob_gap_sum" in sums:
                metrics[GAP_KEYS[0]] = sums["logprob_gap_sum"] / tokens
                metrics[GAP_KEYS[1]] = sums["max_logprob_gap"]
        if self.use_critic:
            metrics["value_loss"] = sums["value_loss"] / minibatches
            metrics["value_clip_ratio"] = sums["value_clip_ratio_sum"] / tokens
        return metrics

    @staticmethod
    def _train_role(group: WorkerGroup, objective: Any, rollout: Rollout, index: list[int],
                    micro: int, packing: Packing | None, **kwargs: Any) -> StepResult:
        return train_objective(group, objective, index,
                               lambda mb: rollout.rows(mb, packing), micro, **kwargs)

    def _rollout_metrics(self, rollout: Rollout, scores: Any, gold: Any) -> dict[str, float]:
        stats = scores.metrics()
        metrics = {"reward": stats["reward/mean"], "reward_std": stats["reward/std"],
                   **{k: v for k, v in stats.items() if k.startswith("rewards/")
                      and k.endswith("/mean")},
                   **scores.extra,  # shaped values, ensemble spread
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
        self._sync_engine_once()
        prompts = [p.text for p in self.eval_prompts]
        ids = generate_ids(self.engine, self.tokenizer, prompts, cfg.max_new_tokens,
                           cfg.batch_size)
        texts = [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        eos = set(self.eos_ids)
        truncated = [not i or i[-1] not in eos for i in ids]
        columns = reward_columns(self.eval_prompts)
        columns.update({TRUNCATED_COLUMN: truncated, COMPLETION_IDS_COLUMN: ids})
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


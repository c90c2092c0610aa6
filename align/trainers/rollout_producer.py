"""What produces PPO's scored rollouts: sampling with the rollout engine, scoring with the
rewards, dynamic sampling and the asynchronous pipeline.

`RolloutProducer.produce(step)` returns one iteration's `ScoredRollout`; what happens between
two calls (experience, updates) is not its business, except that the engine sleeps through it
and receives the new weights after it (`sync_weights`). A round of an iteration samples
`n_samples_per_prompt` completions of each of `prompts_per_step` prompts (the step's own, or
for dynamic sampling's extra rounds, prompts drawn by a seed of (seed, step, round)) and scores
them. With `rollout.async_steps` the first round was submitted iterations ahead
(`align.trainers.async_rollouts`) and each version's weights are checked right after their sync
(`align.trainers.sync_probe`); otherwise every rollout's own gap to the trainer is checked
(`checked_gap`) once the trainer has its old log-probs.

Every round is played by the episode runner (`align.episodes`): without an `environment`, a
one-turn episode per sample, which is the plain rollout; with one, multi-turn episodes with
tools, whose infrastructure failures and drift are checked here (`episode_checks`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from align.config import PPOConfig
from align.data.prompts import PromptExample, reward_columns
from align.data.tables import take
from align.distributed import WorkerGroup
from align.episodes.assemble import episode_metrics, episodes_rollout
from align.episodes.checks import episode_checks
from align.episodes.environment import check_tool_template
from align.episodes.runner import EpisodeRunner
from align.episodes.submit import EpisodeSubmitter, environment_spec
from align.packed_forward import Packing
from align.reward_columns import COMPLETION_IDS_COLUMN, ENVIRONMENT_REWARD_COLUMN
from align.rollout import Sampling
from align.rollout.eos import eos_token_ids
from align.rollout.factory import build_engine, separate_engine
from align.rollout.verify import GAP_KEYS, check_logprob_gap, max_logprob_diff
from align.trainers.async_rollouts import RolloutPipeline
from align.trainers.batches import StepSchedule
from align.trainers.dynamic_sampling import ScoredRollout, sample_until_full
from align.trainers.rollout import completion_ids, repeated_ids
from align.trainers.sync_probe import SyncProbe
from reward_models.protocol import TRUNCATED_COLUMN


class RolloutProducer:
    """Scored rollouts of PPO iterations, and the rollout engine they are sampled with.

    Args:
        cfg: the run's config (`rollout`, `trainer.seed`, `model`).
        tokenizer: the policy's tokenizer.
        prompts: the training prompts; `schedule` orders them over the iterations.
        rewards: the trained-on rewards (`reward_models.CombinedReward`).
        gold: rewards logged beside them, or None.
    """

    def __init__(self, cfg: PPOConfig, tokenizer: Any, prompts: list[PromptExample],
                 schedule: StepSchedule, rewards: Any, gold: Any | None) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts, self.schedule = prompts, schedule
        self.rewards, self.gold = rewards, gold
        self.rollout_engine: Any = None  # align.rollout's engine, started with the workers
        self.pipeline: RolloutPipeline | None = None  # rollout.async_steps >= 1
        self.sync_probe: SyncProbe | None = None  # with it: each version's sync is checked
        self.max_staleness = 0
        self.eos_ids = eos_token_ids(cfg.model, tokenizer)
        spec = environment_spec(cfg)
        check_tool_template(tokenizer, spec)  # before any actor starts
        self.runner = EpisodeRunner(tokenizer, self.eos_ids, cfg.environment, spec,
                                    cfg.data.max_length)

    # ---------------------------------------------------------------- the engine

    def reserve_engine(self) -> None:
        """Start separate engines before the training roles, which share what is left."""
        if separate_engine(self.cfg):
            self.rollout_engine = build_engine(self.cfg, self.tokenizer, None)

    def start(self, policy: WorkerGroup, packing: Packing | None, num_steps: int) -> None:
        """Bind (or start) the rollout engine to the policy workers; set up the asynchronous
        pipeline for `num_steps` iterations where `rollout.async_steps` asks for it."""
        cfg = self.cfg
        if self.rollout_engine is None:
            self.rollout_engine = build_engine(cfg, self.tokenizer, policy)
        else:
            self.rollout_engine.bind(policy)
        self.engine_synced = False  # first sync after a resume has loaded the weights
        self.num_steps = num_steps
        on_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        self.max_logprob_diff = max_logprob_diff(cfg.rollout.vllm.max_logprob_diff,
                                                 cfg.model.dtype, on_gpu)
        if cfg.rollout.async_steps:
            self.pipeline = RolloutPipeline(
                EpisodeSubmitter(self.runner, self.rollout_engine) if self.runner.multi_turn
                else self.rollout_engine, cfg.rollout.async_steps, cfg.rollout.timeout_s)
            self.sync_probe = SyncProbe(
                self.rollout_engine, policy, self.tokenizer, self.eos_ids,
                cfg.trainer.micro_batch_size, packing, cfg.rollout.n_samples_per_prompt,
                rows=max(policy.size, cfg.rollout.vllm.num_engines),
                limit=self.max_logprob_diff,
                logprob_chunk_size=cfg.trainer.logprob_chunk_size)

    def sync_once(self) -> None:
        """Send the engine the policy's weights, once (later syncs follow each update)."""
        if not self.engine_synced:
            self.rollout_engine.update_weights()
            self.engine_synced = True

    def sync_weights(self, timing: dict[str, float], train_span: tuple[float, float]) -> None:
        """After an update: the engines finish what they generated meanwhile (async), wake,
        and receive the new weights; adds the seconds taken to `timing`."""
        if self.pipeline is not None:
            drained = self.pipeline.drain(train_span)
            timing["time/wait"] += drained["time/wait"]
            timing["time/overlap"] = drained["time/overlap"]
        self.rollout_engine.wake()
        timing["time/weight_sync"] = self.rollout_engine.update_weights()

    def shutdown(self) -> None:
        if self.rollout_engine is not None:
            self.rollout_engine.shutdown()

    # ---------------------------------------------------------------- one iteration

    def produce(self, step: int) -> tuple[ScoredRollout | None, dict[str, float],
                                          dict[str, float]]:
        """Iteration `step`'s scored rollout, its metrics (dynamic sampling's) and timing.

        The rollout is None when dynamic sampling kept less than one minibatch of varied
        groups (`rollout/skipped_minibatches` counts the minibatches left out); otherwise the
        engine sleeps until `sync_weights`.
        """
        ro = self.cfg.rollout
        self.sync_once()
        timing = {"time/generate": 0.0, "time/score": 0.0}
        if self.pipeline is not None:  # this version's weights, checked before they sample ahead
            timing.update(self.sync_probe.check(*self._request(step, 0), iteration=step + 1))
            self.pipeline.fill(step, self.num_steps, self._first_round)
        if ro.dynamic_sampling:
            scored, metrics = sample_until_full(
                lambda round_: self._sample_round(step, round_, timing), ro.prompts_per_step,
                ro.n_samples_per_prompt, ro.max_resample_rounds, self.tokenizer.pad_token_id,
                minibatch_size=self.cfg.trainer.global_batch_size)
        else:
            scored, metrics = self._sample_round(step, 0, timing), {}
        if scored is not None:
            self.rollout_engine.sleep()
        return scored, metrics, timing

    def checked_gap(self, stats: dict[str, float], step: int, stale: bool) -> dict[str, float]:
        """`stats` with the rollout's gap to the trainer (GAP_KEYS) checked; logged only, as
        `rollout/stale_*`, where samples came from an earlier version (the gap holds the
        updates since; the probe checked that version's sync)."""
        gap = {key: value for key, value in stats.items() if key in GAP_KEYS}
        if stale:
            rest = {key: value for key, value in stats.items() if key not in GAP_KEYS}
            return {**rest, **{key.replace("rollout/", "rollout/stale_"): value
                               for key, value in gap.items()}}
        if gap:
            check_logprob_gap(gap, self.max_logprob_diff, self.rollout_engine.name, step + 1)
        return stats

    def _sample_round(self, step: int, round_: int, timing: dict[str, float]) -> ScoredRollout:
        """Generate and score one round: the step's own prompts (round 0) or, for dynamic
        sampling, `prompts_per_step` more drawn by a seed of (seed, step, round)."""
        ro = self.cfg.rollout
        examples, sampling = self._request(step, round_)
        repeated = [e for e in examples for _ in range(ro.n_samples_per_prompt)]
        t0, staleness = time.perf_counter(), 0
        if self.pipeline is not None and round_ == 0:  # sampled ahead, while earlier updates ran
            result, staleness, waited = self.pipeline.take(step)
            self.max_staleness = max(self.max_staleness, staleness)
            timing.update({"rollout/staleness": staleness,
                           "rollout/staleness_max": self.max_staleness, "time/wait": waited})
            episodes = (result.episodes if self.runner.multi_turn
                        else self.runner.from_generation(repeated, result))
        else:
            episodes = self.runner.run(self.rollout_engine, repeated, sampling)
        rollout = episodes_rollout(self.tokenizer, examples, ro.n_samples_per_prompt, episodes,
                                   self.eos_ids, self.runner.multi_turn)
        if self.runner.multi_turn:
            timing.update(episode_metrics(episodes))
            episode_checks(episodes, self.cfg.environment, self.runner.spec.name, step)
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

    def _first_round(self, step: int) -> tuple[list[Any], Sampling]:
        """What the pipeline submits: prompt ids, or for episodes the repeated examples."""
        examples, sampling = self._request(step, 0)
        n = self.cfg.rollout.n_samples_per_prompt
        if self.runner.multi_turn:
            return [e for e in examples for _ in range(n)], sampling
        return repeated_ids(examples, n), sampling

    # ---------------------------------------------------------------- held-out prompts

    def held_out(self, examples: list[PromptExample], max_new_tokens: int, batch_size: int
                 ) -> tuple[list[str], list[str], dict[str, list[Any]]]:
        """Greedy completions of held-out prompts: (prompt texts, completion texts, the reward
        columns of both). Multi-turn: each prompt's greedy episode; its completion text is the
        last model turn's."""
        from align.trainers.evaluation import generate_ids

        self.sync_once()
        sampling = Sampling(max_new_tokens=max_new_tokens, greedy=True,
                            logprobs=self.runner.multi_turn)  # episodes carry them throughout
        if self.runner.multi_turn:
            episodes = self.runner.run(self.rollout_engine, examples, sampling)
            rollout = episodes_rollout(self.tokenizer, examples, 1, episodes, self.eos_ids, True)
            columns = {COMPLETION_IDS_COLUMN: completion_ids(rollout), **rollout.columns,
                       TRUNCATED_COLUMN: rollout.truncated}
            # held out, an episode's return: its environment reward plus its turns' rewards
            columns[ENVIRONMENT_REWARD_COLUMN] = [
                None if e.env_reward is None and not e.turn_rewards()
                else (e.env_reward or 0.0) + sum(r for _, r in e.turn_rewards())
                for e in episodes]
            return rollout.prompts, rollout.completions, columns
        prompts = [p.text for p in examples]
        ids = generate_ids(self.rollout_engine, self.tokenizer, prompts, max_new_tokens,
                           batch_size)
        eos = set(self.eos_ids)
        columns = reward_columns(examples)
        columns.update({TRUNCATED_COLUMN: [not i or i[-1] not in eos for i in ids],
                        COMPLETION_IDS_COLUMN: ids})
        return prompts, [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids], columns

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> list[dict[str, Any]] | None:
        """Rollouts sampled with weights a checkpoint lacks (async), or None."""
        return None if self.pipeline is None else self.pipeline.state()

    def load(self, state: list[dict[str, Any]]) -> None:
        if self.pipeline is not None:
            self.pipeline.load(state)

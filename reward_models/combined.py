"""CombinedReward: a config's weighted list of rewards, scored as one per-sample sum.

For each sample the total is ``sum(weight_k * value_k)`` over the rewards whose value is not
None. A None contributes nothing for that sample: the remaining terms are neither renormalised
nor replaced by zero-valued placeholders (TRL's GRPOTrainer does the same). A sample that every
reward skips has no reward at all, which is an error naming the sample. Each reward's own values
are kept, so a trainer can log ``rewards/<name>/mean`` next to the total.

Async rewards are awaited together (concurrently); sync rewards run one after another.

An entry with ``normalize`` or ``clip`` is shaped (``reward_models.robust``) before its weight
applies: training batches (``score``) update its running statistics, evaluation (calling the
object, or ``score(..., update=False)``) only reads them; ``state``/``load`` carry them across a
checkpoint. ``rewards/<name>/mean`` stays the raw value; ``rewards/<name>/shaped_mean`` is what
was trained on. An ensemble entry also logs ``rewards/<name>/std_across_models``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import statistics
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import ConfigError, RewardError
from reward_models.protocol import (
    REWARD_LIMIT,
    LoadedReward,
    RewardValues,
    check_batch,
    describe_sample,
    run_coroutine,
)
from reward_models.robust import RewardShaping
from reward_models.spec import RewardSpec, default_reward_name, load_reward


@dataclass
class CombinedScores:
    """The result of scoring one batch with a CombinedReward."""

    total: list[float]  # weighted sum per sample
    per_reward: dict[str, RewardValues]  # each reward's own values by name, None kept
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # shaping, ensembles

    def metrics(self) -> dict[str, float]:
        """Batch statistics for logging.

        Returns:
            ``reward/mean``, ``reward/std`` for the total, and ``rewards/<name>/mean``,
            ``rewards/<name>/std`` per reward over the samples it applied to (omitted when it
            applied to none), plus ``rewards/<name>/applied`` (the fraction it applied to).
            Empty for an empty batch.
        """
        if not self.total:
            return {}
        out = {"reward/mean": statistics.fmean(self.total), "reward/std": _std(self.total)}
        for name, values in self.per_reward.items():
            present = [v for v in values if v is not None]
            if present:
                out[f"rewards/{name}/mean"] = statistics.fmean(present)
                out[f"rewards/{name}/std"] = _std(present)
            out[f"rewards/{name}/applied"] = len(present) / len(values) if values else 0.0
        out.update(self.extra)
        return out


class CombinedReward:
    """Several rewards with weights, itself usable as a Reward (calling it returns the totals).

    Args:
        rewards: The loaded rewards; their names must be unique.
        weights: One finite weight per reward.

    Raises:
        ConfigError: When the list is empty, lengths differ, or two rewards share a name.
    """

    def __init__(self, rewards: Sequence[LoadedReward], weights: Sequence[float],
                 shaping: Sequence[RewardShaping | None] | None = None) -> None:
        if not rewards:
            raise ConfigError("rewards: at least one reward is needed")
        if len(rewards) != len(weights):
            raise ConfigError(f"rewards: {len(rewards)} rewards but {len(weights)} weights")
        seen: dict[str, str] = {}
        for reward in rewards:
            if reward.name in seen:
                raise ConfigError(
                    f"rewards: {seen[reward.name]!r} and {reward.label!r} are both named "
                    f"{reward.name!r}; give one a different 'name'"
                )
            seen[reward.name] = reward.label
        self.rewards = list(rewards)
        self.weights = [float(w) for w in weights]
        self.shaping = list(shaping) if shaping is not None else [None] * len(self.rewards)

    @classmethod
    def from_specs(
        cls,
        specs: Iterable[str | dict[str, Any] | RewardSpec],
        base_dir: str | Path | None = None,
    ) -> CombinedReward:
        """Load every spec of a config's reward list.

        A name derived from the spec that repeats an earlier one gets a suffix (``_2``, ...);
        an explicit ``name`` that repeats is a ConfigError.

        Args:
            specs: Spec strings, mappings or RewardSpecs (see ``reward_models.spec``).
            base_dir: Folder that relative paths resolve against (default: current directory).

        Returns:
            The combined reward.

        Raises:
            ConfigError: For an invalid or unloadable spec (the message names it and its index).
        """
        parsed = [RewardSpec.coerce(s, where=f"rewards[{i}]") for i, s in enumerate(specs)]
        explicit = {s.name for s in parsed if s.name}
        used: set[str] = set()
        rewards: list[LoadedReward] = []
        try:
            for index, spec in enumerate(parsed):
                if spec.name is None:
                    base = name = default_reward_name(spec)
                    suffix = 2
                    while name in used or name in explicit:
                        name, suffix = f"{base}_{suffix}", suffix + 1
                    if name != base:  # kept in the spec, so it survives pickling
                        spec = dataclasses.replace(spec, name=name)
                try:
                    reward = load_reward(spec, base_dir)
                except ConfigError as err:
                    raise ConfigError(f"rewards[{index}]: {err}") from err
                used.add(reward.name)
                rewards.append(reward)
            shaping = [RewardShaping(s.normalize, s.normalize_window, s.clip, s.label)
                       if s.normalize or s.clip is not None else None for s in parsed]
            return cls(rewards, [s.weight for s in parsed], shaping)
        except BaseException:  # the rewards loaded so far may hold Ray actors
            for reward in rewards:
                reward.close()
            raise

    def close(self) -> None:
        """Release every reward's resources (reward-model actors); safe to call twice."""
        for reward in self.rewards:
            reward.close()

    @property
    def names(self) -> list[str]:
        """The rewards' metric names, in order."""
        return [r.name for r in self.rewards]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """The weighted total per sample (the Reward protocol); shaping statistics are read,
        not updated."""
        return self.score(prompts, completions, update=False, **columns).total

    def state(self) -> dict[str, Any]:
        """The running statistics of every shaped reward, by name (JSON-ready)."""
        return {r.name: shape.state() for r, shape in zip(self.rewards, self.shaping)
                if shape is not None}

    def load(self, state: dict[str, Any]) -> None:
        for reward, shape in zip(self.rewards, self.shaping):
            if shape is not None and reward.name in state:
                shape.load(state[reward.name])

    def score(self, prompts: list[str], completions: list[str], update: bool = True,
              **columns: Any) -> CombinedScores:
        """Score a batch with every reward and combine.

        Args:
            update: add the raw values to the shaped rewards' running statistics first.

        Raises:
            RewardError: When a reward fails (see LoadedReward) or every reward returned None
                for a sample (the message names the sample and the rewards).
        """
        check_batch("combined", prompts, completions, columns)
        results: list[RewardValues | None] = [None] * len(self.rewards)
        pending: dict[int, Awaitable[RewardValues]] = {}
        try:
            for i, reward in enumerate(self.rewards):
                out = reward.start(prompts, completions, **columns)
                if inspect.isawaitable(out):
                    pending[i] = out
                else:
                    results[i] = out
        except BaseException:
            for coro in pending.values():  # never started; close them to avoid a warning
                close = getattr(coro, "close", None)
                if close is not None:
                    close()
            raise
        if pending:
            for i, values in zip(pending, run_coroutine(_gather_in_order(list(pending.values())))):
                results[i] = values
        per_reward = {r.name: values for r, values in zip(self.rewards, results)}
        extra: dict[str, float] = {}
        shaped = list(results)
        for i, (reward, shape) in enumerate(zip(self.rewards, self.shaping)):
            spread = [v for v in getattr(reward.fn, "last_spread", None) or [] if v is not None]
            if spread:
                extra[f"rewards/{reward.name}/std_across_models"] = statistics.fmean(spread)
            if shape is not None:
                shaped[i] = shape(results[i], update)
                present = [v for v in shaped[i] if v is not None]
                if present:
                    extra[f"rewards/{reward.name}/shaped_mean"] = statistics.fmean(present)
        return CombinedScores(self._totals(shaped, prompts), per_reward, extra)

    def _totals(self, results: list[Any], prompts: list[str]) -> list[float]:
        totals = []
        for s in range(len(prompts)):
            terms = [(w, values[s]) for w, values in zip(self.weights, results)]
            if all(value is None for _, value in terms):
                labels = ", ".join(repr(r.label) for r in self.rewards)
                raise RewardError(
                    f"every reward returned None for {describe_sample(s, prompts)} "
                    f"(rewards {labels}); at least one must score each sample"
                )
            total = sum(w * value for w, value in terms if value is not None)
            if not abs(total) <= REWARD_LIMIT:  # NaN too (inf - inf)
                parts = ", ".join(f"{r.label!r}: {w:g} x {v:g}" for r, (w, v)
                                  in zip(self.rewards, terms) if v is not None)
                raise RewardError(
                    f"the weighted reward of {describe_sample(s, prompts)} is {total:g} "
                    f"({parts}); it must lie within +-{REWARD_LIMIT:g}: lower the weights"
                )
            totals.append(total)
        return totals


async def _gather_in_order(coros: list[Awaitable[RewardValues]]) -> list[RewardValues]:
    # All run to completion; the first failure in config order is the one reported.
    outcomes = await asyncio.gather(*coros, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


def _std(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0

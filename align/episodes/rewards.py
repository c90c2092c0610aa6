"""The environment's own reward: `get_reward()` of each finished episode, one more weighted
entry beside the config's `rewards` (TRL: weight 1, named after the class)."""

from __future__ import annotations

from typing import Any

from align.reward_columns import ENVIRONMENT_REWARD_COLUMN


def with_environment_reward(specs: list[dict[str, Any]], spec: Any | None,
                            weight: float) -> Any:
    """A CombinedReward of `specs` and, where the environment defines `get_reward`, its
    reward (metric `rewards/<ClassName>/mean`), weighted by `environment.reward_weight`. A
    TurnEnvironment with no other reward gets a 0 here: its per-turn rewards (kept apart, on
    their turns' last tokens) are the return."""
    from reward_models import CombinedReward
    from reward_models.protocol import LoadedReward

    if spec is None or not (spec.has_reward or (spec.protocol == "turns" and not specs)):
        return CombinedReward.from_specs(specs)
    base = CombinedReward.from_specs(specs) if specs else None
    own = LoadedReward(environment_reward, f"{spec.name}.get_reward", spec.name)
    if base is None:
        return CombinedReward([own], [weight])
    return CombinedReward([*base.rewards, own], [*base.weights, weight],
                          [*base.shaping, None])


def environment_reward(prompts: list[Any], completions: list[Any],
                       **columns: Any) -> list[float | None]:
    """Each episode's `get_reward()`, computed when it ended; 0 for a TurnEnvironment without
    one (its per-turn rewards are the whole return)."""
    return [0.0 if value is None else value for value in columns[ENVIRONMENT_REWARD_COLUMN]]

"""The environment's own reward: `get_reward()` of each finished episode, one more weighted
entry beside the config's `rewards` (TRL: weight 1, named after the class)."""

from __future__ import annotations

from typing import Any

from align.reward_columns import ENVIRONMENT_REWARD_COLUMN


def with_environment_reward(specs: list[dict[str, Any]], spec: Any | None,
                            weight: float) -> Any:
    """A CombinedReward of `specs` and, where the environment defines `get_reward`, its
    reward (metric `rewards/<ClassName>/mean`), weighted by `environment.reward_weight`."""
    from reward_models import CombinedReward
    from reward_models.protocol import LoadedReward

    if spec is None or not spec.has_reward:
        return CombinedReward.from_specs(specs)
    base = CombinedReward.from_specs(specs) if specs else None
    own = LoadedReward(environment_reward, f"{spec.name}.get_reward", spec.name)
    if base is None:
        return CombinedReward([own], [weight])
    return CombinedReward([*base.rewards, own], [*base.weights, weight],
                          [*base.shaping, None])


def environment_reward(prompts: list[Any], completions: list[Any],
                       **columns: Any) -> list[float | None]:
    """Each episode's `get_reward()`, computed when it ended (None: it has none)."""
    return list(columns[ENVIRONMENT_REWARD_COLUMN])

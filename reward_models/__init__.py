"""reward_models: the reward side of align: the Reward protocol, loaders for plug-ins, built-in
rules, a remote (HTTP) reward client, and the weighted combination a trainer calls.

A reward is any ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's reward
function signature; ``async def`` works too). A config lists rewards with weights; each entry is
loaded with ``load_reward`` and the list with ``CombinedReward.from_specs``::

    reward = CombinedReward.from_specs(["reward_models.builtin:exact_match",
                                        {"spec": "verl:my_rewards.py:compute_score",
                                         "weight": 0.5}])
    scores = reward.score(prompts, completions, answer=answers)
    scores.total, scores.metrics()   # per-sample sum; {"rewards/exact_match/mean": ...}

Spec syntax (``reward_models.spec``), kinds (``reward_models.loading``), style adapters
(``reward_models.style_adapters``), the HTTP protocol (``reward_models.http_reward``), trained
reward-model folders (``reward_models.reward_model``), scoring with a trained model
(``reward_models.scorer``) and its HTTP server (``reward_models.server``) are documented in
those modules.
"""

from reward_models.combined import CombinedReward, CombinedScores
from reward_models.http_reward import HttpReward
from reward_models.loaded_reward import LoadedReward
from reward_models.loading import (
    SpecKind,
    default_reward_name,
    is_model_folder,
    load_reward,
    register_spec_kind,
)
from reward_models.protocol import Reward, RewardValues, run_coroutine
from reward_models.reward_model import RewardModelScorer  # registers model folders
from reward_models.spec import STYLES, RewardSpec

__all__ = [
    "STYLES",
    "CombinedReward",
    "CombinedScores",
    "HttpReward",
    "LoadedReward",
    "Reward",
    "RewardSpec",
    "RewardModelScorer",
    "RewardValues",
    "SpecKind",
    "default_reward_name",
    "is_model_folder",
    "load_reward",
    "register_spec_kind",
    "run_coroutine",
]

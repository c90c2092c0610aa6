"""reward_models: the reward side of align: the Reward protocol, loaders for plug-ins, built-in
rules, a remote (HTTP) reward client, trained reward models, and the weighted combination a
trainer calls.

A reward is any ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's reward
function signature; ``async def`` works too). A config lists rewards with weights; each entry is
loaded with ``load_reward`` and the list with ``CombinedReward.from_specs``::

    reward = CombinedReward.from_specs(["reward_models.builtin:exact_match",
                                        {"spec": "verl:my_rewards.py:compute_score",
                                         "weight": 0.5}])
    scores = reward.score(prompts, completions, answer=answers)
    scores.total, scores.metrics()   # per-sample sum; {"rewards/exact_match/mean": ...}

One concept a module:

- ``protocol``: the Reward protocol, the checks on a reward's inputs and outputs, LoadedReward;
- ``spec``: RewardSpec (how an entry is written) and ``load_reward`` (every kind of spec);
- ``style_adapters``: functions written for TRL, veRL or OpenRLHF, served unchanged;
- ``combined``: the weighted sum a trainer calls;
- ``robust``: ensembles (mean - k * std across reward models) and shaping (normalise, clip);
- ``builtin``: rule rewards for the embedded task;
- ``http_reward``: the client of a remote reward (JSON over HTTP);
- ``reward_model``: scoring with a trained reward model, and a model folder as a reward;
- ``server``: ``align serve-rm`` and ``align eval-rm``.

Importing the package does not import torch: ``RewardModelScorer`` is loaded on first use.
"""

from typing import Any

from reward_models.combined import CombinedReward, CombinedScores
from reward_models.http_reward import HttpReward
from reward_models.protocol import LoadedReward, Reward, RewardValues, run_coroutine
from reward_models.spec import STYLES, RewardSpec, default_reward_name, load_reward

__all__ = [
    "STYLES",
    "CombinedReward",
    "CombinedScores",
    "HttpReward",
    "LoadedReward",
    "Reward",
    "RewardModelScorer",
    "RewardSpec",
    "RewardValues",
    "default_reward_name",
    "load_reward",
    "run_coroutine",
]


def __getattr__(name: str) -> Any:
    if name == "RewardModelScorer":  # imports torch; only when asked for
        from reward_models.reward_model import RewardModelScorer

        return RewardModelScorer
    raise AttributeError(f"module 'reward_models' has no attribute {name!r}")

"""RewardModelWorker: a Ray actor holding one frozen copy of a trained reward model.

A `RewardModelScorer` starts a group of these (data parallel: each rank scores its share of a
batch). Kept apart from `reward_models.reward_model` so that importing `reward_models` does not
import torch, DeepSpeed or Ray.
"""

from __future__ import annotations

from typing import Any

from align.distributed.worker import BaseWorker
from reward_models.scorer import load_reward_model, score_texts


class RewardModelWorker(BaseWorker):
    """One rank: loads the folder once, then scores the samples it is sent."""

    def load(self, path: str, dtype: str, batch_size: int, max_length: int | None) -> None:
        self.model, self.tokenizer = load_reward_model(path, dtype)
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, prompts: list[Any], completions: list[Any],
              truncated: list[bool] | None = None) -> list[float]:
        return score_texts(self.model, self.tokenizer, prompts, completions, self.batch_size,
                           self.max_length, truncated)

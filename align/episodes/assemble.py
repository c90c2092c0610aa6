"""Episodes into the rollout the trainer learns on, and what the rewards and the logs see.

A one-turn episode with no environment is today's rollout exactly (`assemble_rollout`). A
multi-turn episode's row is its prompt, then every turn's tokens in order; labels (the loss
mask) only on the model's sampled tokens; the engine's log-probs at those positions; per-turn
rewards on the last token of their turn (`token_rewards`). An episode that failed for
infrastructure reasons keeps no label at all and is left out of its group's baseline
(`valid`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from align.data.prompts import PromptExample, reward_columns
from align.episodes.episode import Episode, check_invariants
from align.losses import IGNORE_INDEX
from align.reward_columns import (
    COMPLETION_MESSAGES_COLUMN,
    ENVIRONMENT_REWARD_COLUMN,
    ENVIRONMENTS_COLUMN,
)
from align.rollout.base import Generation
from align.rollout.verify import shifted_logprobs
from align.trainers.rollout import (
    Rollout,
    assemble_rollout,
    decode_completions,
    pad_sequences,
)


def episodes_rollout(tokenizer: Any, examples: list[PromptExample], n_samples: int,
                     episodes: list[Episode], eos_ids: list[int],
                     multi_turn: bool) -> Rollout:
    """The Rollout of `episodes`, played from `examples` each repeated `n_samples` times."""
    if not multi_turn:
        generation = Generation([e.ids for e in episodes],
                                None if any(e.segments[0].logprobs is None for e in episodes)
                                else [e.logprobs for e in episodes])
        rollout = assemble_rollout(tokenizer, examples, n_samples, generation, eos_ids)
        rollout.episodes = episodes
        return rollout
    for episode in episodes:
        if episode.infra_error is None:
            check_invariants(episode)
    batch = pad_sequences([e.prompt_ids for e in episodes], [e.ids for e in episodes],
                          tokenizer.pad_token_id)
    labels = batch["labels"]
    for row, episode in enumerate(episodes):
        start = len(episode.prompt_ids)
        mask = torch.tensor(episode.mask, dtype=torch.bool)
        if episode.infra_error is not None:
            mask[:] = False
        span = labels[row, start:start + len(mask)]
        span[~mask] = IGNORE_INDEX
    width = batch["input_ids"].shape[1]
    token_rewards = torch.zeros(len(episodes), width - 1)
    for row, episode in enumerate(episodes):
        for at, reward in episode.turn_rewards():  # token `at` after the prompt, shifted by 1
            token_rewards[row, len(episode.prompt_ids) + at - 1] = reward
    last_turns = [_last_model_ids(e) for e in episodes]
    has_logprobs = all(e.infra_error is not None or e.segments for e in episodes)
    columns = reward_columns(examples, n_samples)
    columns.update({COMPLETION_MESSAGES_COLUMN: [e.completion_messages for e in episodes],
                    ENVIRONMENTS_COLUMN: [getattr(e.env, "instance", None) for e in episodes],
                    ENVIRONMENT_REWARD_COLUMN: [e.env_reward for e in episodes]})
    return Rollout(
        prompts=tokenizer.batch_decode([e.prompt_ids for e in episodes]),
        completions=decode_completions(tokenizer, last_turns),
        columns=columns,
        batch=batch,
        lengths=[sum(e.mask) for e in episodes],
        truncated=[e.truncated for e in episodes],
        engine_logprobs=(shifted_logprobs([len(e.prompt_ids) for e in episodes],
                                          [_logprobs(e) for e in episodes], width)
                         if has_logprobs else None),
        pad_id=tokenizer.pad_token_id,
        valid=[e.infra_error is None for e in episodes],
        token_rewards=token_rewards if token_rewards.any() else None,
        episodes=episodes,
    )


def _last_model_ids(episode: Episode) -> list[int]:
    for segment in reversed(episode.segments):
        if segment.kind == "model":
            return segment.ids
    return []


def _logprobs(episode: Episode) -> list[float]:
    if episode.infra_error is not None:
        return [0.0] * len(episode.ids)
    return [p if p is not None else 0.0 for p in episode.logprobs]


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """`episodes/*` metrics of one iteration's episodes."""
    if not episodes:
        return {}
    kept = [e for e in episodes if e.infra_error is None]
    tokens = sum(len(e.ids) for e in kept)
    return {
        "episodes/turns_mean": float(np.mean([e.turns for e in kept])) if kept else 0.0,
        "episodes/tool_calls": float(np.mean([e.tool_calls for e in episodes])),
        "episodes/tool_errors": float(np.mean([e.tool_errors for e in episodes])),
        "episodes/tool_seconds": float(sum(e.tool_seconds for e in episodes)),
        "episodes/tool_outputs_cut": float(sum(e.tool_outputs_cut for e in episodes)),
        "episodes/truncated": float(np.mean([e.truncated for e in episodes])),
        "episodes/infra_failures": float(sum(e.infra_error is not None for e in episodes)),
        "episodes/env_token_share": (sum(e.env_tokens() for e in kept) / tokens
                                     if tokens else 0.0),
        "episodes/turn_reward": float(np.mean([sum(s.reward for s in e.segments)
                                               for e in kept])) if kept else 0.0,
        "episodes/drift_rate": (sum(e.drift is not None for e in kept) / len(kept)
                                if kept else 0.0),
        "episodes/reencode_rate": (sum(e.reencodes for e in kept) / len(kept)
                                   if kept else 0.0),
    }

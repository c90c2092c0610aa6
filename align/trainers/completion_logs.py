"""What `trainer.log_completions_every` writes: the first samples of a rollout with their
rewards; for multi-turn episodes, each whole episode (every turn, each tool call and its
output, the per-turn rewards, how it ended)."""

from __future__ import annotations

from typing import Any

from align.trainers.rollout import Rollout

COMPLETIONS_LOGGED = 8  # samples per completions table


def completion_rows(rollout: Rollout, scores: Any, gold: Any) -> list[dict[str, Any]]:
    """The first samples of a rollout with their rewards, for a completions table."""
    rows = []
    episodes = rollout.episodes if rollout.valid is not None else None
    for i in range(min(COMPLETIONS_LOGGED, rollout.size)):
        row = {"prompt": rollout.prompts[i], "completion": rollout.completions[i],
               "reward": scores.total[i]}
        row.update({f"rewards/{name}": values[i] for name, values in scores.per_reward.items()})
        if gold is not None:
            row["reward/gold"] = gold.total[i]
        if episodes is not None:
            row.update(episode_row(episodes[i]))
        rows.append(row)
    return rows


def episode_row(episode: Any) -> dict[str, Any]:
    """An episode for the completions table: its turns as text and what happened."""
    turns = [f"[{m['role']}{' ' + m['name'] if m.get('name') else ''}] {m['content']}"
             for m in episode.completion_messages]
    rewards = [s.reward for s in episode.segments if s.kind == "model"]
    return {"episode": "\n".join(turns), "turns": episode.turns,
            "tool_calls": episode.tool_calls, "tool_errors": episode.tool_errors,
            "turn_rewards": rewards if any(rewards) else None,
            "truncated": episode.truncated, "infra_error": episode.infra_error,
            "drift": None if episode.drift is None else episode.drift.describe()}

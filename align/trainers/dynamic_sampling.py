"""DAPO's dynamic sampling (Yu et al. 2025): train only on groups whose rewards differ.

Under a group estimator (GRPO, RLOO) a prompt whose samples all got the same reward has zero
advantage on every sample: it adds nothing to the policy gradient but still dilutes the
batch (and pulls it towards the KL term). With `rollout.dynamic_sampling`, such groups are
dropped and `prompts_per_step` more prompts are sampled, up to `rollout.max_resample_rounds`
extra rounds, until `prompts_per_step` varied groups are kept (extra ones are cut, in sampling
order). If the rounds run out first, the iteration trains on the varied groups it has, cut to
whole minibatches of `trainer.global_batch_size` (fewer than one: no update that iteration):
a trained batch never holds an all-equal group (veRL raises an error instead; we keep going,
since late in training most prompts are solved and the next iteration may do better). The
optimizer steps a short batch leaves out are counted, so the learning-rate schedule can move
on over them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from align.losses import IGNORE_INDEX
from align.trainers.rollout import Rollout


@dataclass
class ScoredRollout:
    """One round's samples with their rewards (and logged-only gold rewards)."""

    rollout: Rollout
    scores: Any  # reward_models.CombinedScores: `total` and `per_reward` lists, one per sample
    gold: Any | None = None  # the same for `gold_rewards`, or None
    # Per sample, policy versions between its sampling and this update (async rollouts sample
    # ahead; dynamic sampling's extra rounds do not); None: all 0.
    staleness: list[int] | None = None


def varied_groups(totals: list[float], group_size: int) -> list[int]:
    """Indices of the groups (contiguous runs of `group_size` samples) whose rewards are not
    all equal."""
    return [g for g in range(len(totals) // group_size)
            if len(set(totals[g * group_size:(g + 1) * group_size])) > 1]


def sample_until_full(sample: Callable[[int], ScoredRollout], target_groups: int,
                      group_size: int, max_rounds: int, pad_id: int,
                      minibatch_size: int = 1) -> tuple[ScoredRollout | None, dict[str, float]]:
    """Rounds of `sample(round)` until `target_groups` varied groups are kept.

    Args:
        sample: generates and scores one round (round 0 is the step's own prompts).
        target_groups: groups a full batch holds (rollout.prompts_per_step).
        group_size: samples per prompt.
        max_rounds: extra rounds allowed after round 0.
        pad_id: the tokenizer's pad id, to lay rounds of different widths into one batch.
        minibatch_size: trainer.global_batch_size. Kept groups are cut (the last sampled
            first) until the kept samples fill whole minibatches: a short minibatch would give
            the ranks fewer micro-batches than their gradient accumulation steps.

    Returns:
        (the kept samples, or None when not one minibatch of varied groups was found; metrics
        `rollout/filtered_groups` (all-equal groups dropped), `rollout/resample_rounds`,
        `rollout/kept_groups`, `rollout/skipped_minibatches` (minibatches of a full batch that
        the kept samples do not fill, per epoch), `rollout/unfiltered_reward` (mean reward
        of round 0, before filtering: the policy's reward, comparable with runs without
        dynamic sampling) and, where rounds report staleness, `rollout/staleness_mean` (over
        the kept samples: async round 0 is sampled ahead, extra rounds are not)).
    """
    kept: list[tuple[ScoredRollout, list[int]]] = []
    n_kept = filtered = rounds = 0
    first_reward = 0.0
    for rounds in range(max_rounds + 1):
        scored = sample(rounds)
        totals = episode_returns(scored)
        if rounds == 0:
            first_reward = sum(totals) / max(len(totals), 1)
        groups = varied_groups(totals, group_size)
        filtered += len(totals) // group_size - len(groups)
        groups = groups[:target_groups - n_kept]
        kept.append((scored, groups))
        n_kept += len(groups)
        if n_kept >= target_groups:
            break
    while n_kept and (n_kept * group_size) % minibatch_size:
        n_kept -= 1
    skipped = (target_groups - n_kept) * group_size // minibatch_size
    metrics = {"rollout/filtered_groups": float(filtered), "rollout/resample_rounds": float(rounds),
               "rollout/kept_groups": float(n_kept), "rollout/skipped_minibatches": float(skipped),
               "rollout/unfiltered_reward": first_reward}
    if not n_kept:
        return None, metrics
    parts, budget = [], n_kept
    for scored, groups in kept:
        rows = [g * group_size + i for g in groups[:budget] for i in range(group_size)]
        budget -= len(groups[:budget])
        if rows:
            parts.append(take_rows(scored, rows))
    result = concat_scored(parts, pad_id)
    if result.staleness is not None:
        metrics["rollout/staleness_mean"] = sum(result.staleness) / len(result.staleness)
    return result, metrics


def take_rows(scored: ScoredRollout, rows: list[int]) -> ScoredRollout:
    """The samples `rows` of one round (its rollout has no per-token tensors yet)."""
    r = scored.rollout
    index = torch.tensor(rows, dtype=torch.long)
    rollout = Rollout(prompts=[r.prompts[i] for i in rows],
                      completions=[r.completions[i] for i in rows],
                      columns={k: [v[i] for i in rows] for k, v in r.columns.items()},
                      batch={k: v[index] for k, v in r.batch.items()},
                      lengths=[r.lengths[i] for i in rows],
                      truncated=[r.truncated[i] for i in rows],
                      engine_logprobs=(None if r.engine_logprobs is None
                                       else r.engine_logprobs[index]),
                      pad_id=r.pad_id,
                      valid=None if r.valid is None else [r.valid[i] for i in rows],
                      token_rewards=(None if r.token_rewards is None
                                     else r.token_rewards[index]),
                      episodes=None if r.episodes is None else [r.episodes[i] for i in rows])
    return ScoredRollout(rollout, _take_scores(scored.scores, rows),
                         None if scored.gold is None else _take_scores(scored.gold, rows),
                         None if scored.staleness is None else [scored.staleness[i] for i in rows])


def concat_scored(parts: list[ScoredRollout], pad_id: int) -> ScoredRollout:
    """Rounds joined in order into one; batches are right-padded to the widest round."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.rollout.batch["input_ids"].shape[1] for p in parts)
    first = parts[0].rollout
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}  # attention_mask and the rest: 0
    batch = {key: torch.cat([torch.nn.functional.pad(p.rollout.batch[key],
                                                     (0, width - p.rollout.batch[key].shape[1]),
                                                     value=fill.get(key, 0)) for p in parts])
             for key in first.batch}
    rollout = Rollout(prompts=[x for p in parts for x in p.rollout.prompts],
                      completions=[x for p in parts for x in p.rollout.completions],
                      columns={k: [x for p in parts for x in p.rollout.columns[k]]
                               for k in first.columns},
                      batch=batch, lengths=[x for p in parts for x in p.rollout.lengths],
                      truncated=[x for p in parts for x in p.rollout.truncated],
                      engine_logprobs=_concat_logprobs([p.rollout for p in parts], width - 1),
                      pad_id=first.pad_id,
                      valid=(None if all(p.rollout.valid is None for p in parts) else
                             [x for p in parts for x in (p.rollout.valid
                                                         or [True] * p.rollout.size)]),
                      token_rewards=_concat_token_rewards([p.rollout for p in parts], width - 1),
                      episodes=(None if any(p.rollout.episodes is None for p in parts)
                                else [x for p in parts for x in p.rollout.episodes]))
    gold = None if parts[0].gold is None else _concat_scores([p.gold for p in parts])
    staleness = (None if all(p.staleness is None for p in parts) else
                 [x for p in parts for x in (p.staleness or [0] * p.rollout.size)])
    return ScoredRollout(rollout, _concat_scores([p.scores for p in parts]), gold, staleness)


def episode_returns(scored: ScoredRollout) -> list[float]:
    """Each sample's return: its reward, plus its turns' rewards for multi-turn episodes."""
    turns = scored.rollout.token_rewards
    if turns is None:
        return list(scored.scores.total)
    return [t + float(x) for t, x in zip(scored.scores.total, turns.sum(-1))]


def _concat_token_rewards(rollouts: list[Rollout], width: int) -> torch.Tensor | None:
    """The rounds' (n, T-1) per-turn rewards (0 where a round has none), stacked."""
    if all(r.token_rewards is None for r in rollouts):
        return None
    pad = torch.nn.functional.pad
    return torch.cat([pad(r.token_rewards, (0, width - r.token_rewards.shape[1]))
                      if r.token_rewards is not None else torch.zeros(r.size, width)
                      for r in rollouts])


def _concat_logprobs(rollouts: list[Rollout], width: int) -> torch.Tensor | None:
    """The rounds' (n, T-1) engine log-probs, right-padded with 0 to `width` and stacked."""
    if any(r.engine_logprobs is None for r in rollouts):
        return None
    return torch.cat([torch.nn.functional.pad(r.engine_logprobs,
                                              (0, width - r.engine_logprobs.shape[1]))
                      for r in rollouts])


def _take_scores(scores: Any, rows: list[int]) -> Any:
    return type(scores)(total=[scores.total[i] for i in rows],
                        per_reward={k: [v[i] for i in rows] for k, v in scores.per_reward.items()})


def _concat_scores(parts: list[Any]) -> Any:
    return type(parts[0])(total=[x for p in parts for x in p.total],
                          per_reward={k: [x for p in parts for x in p.per_reward[k]]
                                      for k in parts[0].per_reward})

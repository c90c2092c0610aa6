"""DAPO dynamic sampling: which groups are kept, resampling rounds, and a trained batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.losses import IGNORE_INDEX
from align.tracking import read_metrics
from align.trainers.dynamic_sampling import ScoredRollout, sample_until_full, varied_groups
from align.trainers.ppo import PPOTrainer
from align.trainers.rollout import Rollout, pad_sequences
from reward_models import CombinedScores
from tests.conftest import tiny_ppo_config

REWARD_FILE = Path(__file__).with_name("group_reward.py")


def fake_round(tag: str, totals: list[float], width: int) -> ScoredRollout:
    """Samples named `tag:i` with completions of `width` tokens, rewards `totals`."""
    n = len(totals)
    batch = pad_sequences([[5]] * n, [[7] * width] * n, pad_id=0)
    rollout = Rollout(prompts=[f"{tag}:{i}" for i in range(n)], completions=["x"] * n,
                      columns={"answer": [f"{tag}{i}" for i in range(n)]}, batch=batch,
                      lengths=[width] * n, truncated=[False] * n)
    return ScoredRollout(rollout, CombinedScores(totals, {"r": totals}),
                         CombinedScores([-t for t in totals], {"g": totals}))


def test_varied_groups():
    assert varied_groups([1, 1, 0, 1, 0, 0, 1, 0], group_size=2) == [1, 3]


def test_rounds_until_full_keep_varied_groups_in_order_and_pad_rounds():
    rounds = [fake_round("a", [1, 1, 0, 1, 0, 0, 1, 0], width=2),
              fake_round("b", [0, 1, 1, 1, 1, 0, 0, 1], width=3)]
    scored, metrics = sample_until_full(lambda r: rounds[r], target_groups=4, group_size=2,
                                        max_rounds=3, pad_id=0)
    assert metrics == {"rollout/filtered_groups": 3.0, "rollout/resample_rounds": 1.0,
                       "rollout/kept_groups": 4.0, "rollout/unfiltered_reward": 0.5}
    # a: groups 1 and 3; b: groups 0 and 2 (its group 3 is not needed)
    assert scored.rollout.prompts == ["a:2", "a:3", "a:6", "a:7", "b:0", "b:1", "b:4", "b:5"]
    assert scored.scores.total == [0, 1, 1, 0, 0, 1, 1, 0]
    assert scored.scores.per_reward["r"] == scored.scores.total
    assert scored.gold.total == [-x for x in scored.scores.total]
    assert scored.rollout.columns["answer"][:2] == ["a2", "a3"]
    labels = scored.rollout.batch["labels"]
    assert labels.shape == (8, 4)  # the wider round's width
    assert labels[0].tolist() == [IGNORE_INDEX, 7, 7, IGNORE_INDEX]
    assert scored.rollout.batch["attention_mask"][0].tolist() == [1, 1, 1, 0]
    for g in range(4):
        assert len(set(scored.scores.total[2 * g:2 * g + 2])) == 2


def test_rounds_run_out_short_batch_cut_to_the_worker_count():
    rounds = [fake_round(str(r), [0, 1, 1, 1, 0, 0], width=1) for r in range(3)]
    calls = []

    def sample(r):
        calls.append(r)
        return rounds[r]

    scored, metrics = sample_until_full(sample, target_groups=3, group_size=2, max_rounds=1,
                                        pad_id=0, multiple_of=4)
    assert calls == [0, 1]  # max_rounds=1: one extra round only
    assert metrics["rollout/kept_groups"] == 2.0 and metrics["rollout/filtered_groups"] == 4.0
    assert scored.rollout.size == 4
    scored, metrics = sample_until_full(lambda r: rounds[r], target_groups=3, group_size=2,
                                        max_rounds=0, pad_id=0, multiple_of=4)
    assert scored is None and metrics["rollout/kept_groups"] == 0.0  # 1 group: 2 % 4 != 0


@pytest.mark.slow
def test_trained_batches_hold_no_all_equal_group(tmp_path, ray_local, monkeypatch):
    group_size = 4
    seen: list[torch.Tensor] = []
    make_experience = PPOTrainer._make_experience

    def recording(self, rollout, scores):
        seen.append(scores.clone())
        return make_experience(self, rollout, scores)

    monkeypatch.setattr(PPOTrainer, "_make_experience", recording)
    cfg = tiny_ppo_config(tmp_path, f"rewards=[{{spec: '{REWARD_FILE}:half_constant'}}]",
                          "rollout.dynamic_sampling=true", "rollout.max_resample_rounds=3",
                          f"rollout.n_samples_per_prompt={group_size}",
                          "trainer.max_steps=3", "distributed.num_workers=2")
    PPOTrainer(cfg, show_progress=False).fit()
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if "rollout/kept_groups" in m]
    assert len(steps) == 3 and len(seen) == 3
    assert sum(m["rollout/filtered_groups"] for m in steps) > 0
    assert max(m["rollout/resample_rounds"] for m in steps) >= 1
    for scores, m in zip(seen, steps):
        groups = scores.view(-1, group_size)
        assert len(groups) == m["rollout/kept_groups"] > 0
        assert bool((groups.max(1).values > groups.min(1).values).all()), groups

"""DAPO dynamic sampling: which groups are kept, resampling rounds, and a trained batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.losses import IGNORE_INDEX
from align.tracking import read_metrics
from align.trainers.dynamic_sampling import ScoredRollout, sample_until_full, varied_groups
from align.trainers.experience import ExperienceMaker
from align.trainers.ppo import PPOTrainer
from align.trainers.rollout import Rollout, pad_sequences
from reward_models import CombinedScores
from tests.conftest import tiny_ppo_config
from tests.trainers.test_ppo import RecordedPPO

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
                       "rollout/kept_groups": 4.0, "rollout/skipped_minibatches": 0.0,
                       "rollout/unfiltered_reward": 0.5}
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


def test_rounds_run_out_short_batch_cut_to_whole_minibatches():
    rounds = [fake_round(str(r), [0, 1, 1, 1, 0, 0], width=1) for r in range(3)]
    calls = []

    def sample(r):
        calls.append(r)
        return rounds[r]

    scored, metrics = sample_until_full(sample, target_groups=3, group_size=2, max_rounds=1,
                                        pad_id=0, minibatch_size=2)
    assert calls == [0, 1]  # max_rounds=1: one extra round only
    assert metrics["rollout/kept_groups"] == 2.0 and metrics["rollout/filtered_groups"] == 4.0
    assert scored.rollout.size == 4 and metrics["rollout/skipped_minibatches"] == 1.0


def test_a_short_batch_keeps_whole_minibatches_only():
    """Three varied groups of 4 where a minibatch is 8 samples: the last sampled group is cut,
    so every minibatch is whole (a short one would give the ranks too few micro-batches)."""
    rounds = [fake_round(str(r), [0, 0, 0, 0, 0, 1, 2, 3], width=1) for r in range(3)]
    scored, metrics = sample_until_full(lambda r: rounds[r], target_groups=4, group_size=4,
                                        max_rounds=2, pad_id=0, minibatch_size=8)
    assert metrics["rollout/resample_rounds"] == 2.0 and metrics["rollout/kept_groups"] == 2.0
    assert metrics["rollout/skipped_minibatches"] == 1.0  # of the 2 a full batch has
    assert scored.rollout.size == 8
    assert scored.rollout.prompts == [f"{r}:{i}" for r in "01" for i in range(4, 8)]
    # One varied group, 4 samples: not one minibatch, so nothing to train on.
    scored, metrics = sample_until_full(lambda r: rounds[r], target_groups=4, group_size=4,
                                        max_rounds=0, pad_id=0, minibatch_size=8)
    assert scored is None and metrics["rollout/kept_groups"] == 0.0
    assert metrics["rollout/skipped_minibatches"] == 2.0


def test_each_round_reports_its_own_staleness():
    """Async: round 0 was sampled a version ahead, extra rounds by the current weights. Kept
    samples carry their round's staleness; a batch of extra rounds alone is current."""
    def round_(tag, totals, behind):
        scored = fake_round(tag, totals, width=1)
        scored.staleness = [behind] * len(totals)
        return scored

    ahead, flat, now = (round_("a", [1, 1, 0, 1], 1), round_("f", [1, 1, 0, 0], 1),
                        round_("b", [0, 1, 0, 1], 0))
    scored, metrics = sample_until_full(lambda r: [ahead, now][r], target_groups=2,
                                        group_size=2, max_rounds=1, pad_id=0)
    assert scored.rollout.prompts == ["a:2", "a:3", "b:0", "b:1"]
    assert scored.staleness == [1, 1, 0, 0] and metrics["rollout/staleness_mean"] == 0.5
    scored, metrics = sample_until_full(lambda r: [flat, now][r], target_groups=2,
                                        group_size=2, max_rounds=1, pad_id=0)
    assert scored.staleness == [0, 0, 0, 0] and metrics["rollout/staleness_mean"] == 0.0


@pytest.mark.slow
def test_trained_batches_hold_no_all_equal_group(tmp_path, ray_local, monkeypatch):
    group_size = 4
    seen: list[torch.Tensor] = []
    make_experience = ExperienceMaker.make

    def recording(self, rollout, scores, *roles):
        seen.append(scores.clone())
        return make_experience(self, rollout, scores, *roles)

    monkeypatch.setattr(ExperienceMaker, "make", recording)
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


@pytest.mark.slow
def test_a_short_batch_under_gradient_accumulation_trains_whole_minibatches(tmp_path, ray_local):
    """Accumulation 2 (micro-batches of 4, minibatches of 8): three rounds find three varied
    groups (12 samples), so the iteration trains one whole minibatch and skips the second; the
    linear LR schedule (4 planned steps) moves on over the skipped one."""
    cfg = tiny_ppo_config(tmp_path, f"rewards=[{{spec: '{REWARD_FILE}:last_group_varied'}}]",
                          "algorithm.estimator=grpo", "rollout.dynamic_sampling=true",
                          "rollout.max_resample_rounds=2", "trainer.scheduler=linear",
                          "trainer.global_batch_size=8", "trainer.micro_batch_size=4")
    trainer = RecordedPPO(cfg, show_progress=False)
    trainer.fit()
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "policy_loss" in m]
    assert [m["rollout/kept_groups"] for m in steps] == [2.0, 2.0]
    assert [m["rollout/skipped_minibatches"] for m in steps] == [1.0, 1.0]
    taken = [results[0]["shared"]["lr"] for method, _, results in trainer.calls
             if method == "train_step"]
    # Each iteration holds 2 of the 4 planned steps; the skipped one comes first, so the steps
    # taken are the 2nd and the 4th: 3/4 and 1/4 of the peak rate (without it: 1 and 3/4).
    assert taken == pytest.approx([0.75 * cfg.trainer.lr, 0.25 * cfg.trainer.lr])

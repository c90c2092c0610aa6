"""PPO-family training end to end: every estimator on 2 workers, learning, 2-node placement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from align.tracking import read_metrics
from align.trainers.ppo import PPOTrainer
from tests.conftest import tiny_ppo_config

pytestmark = pytest.mark.slow
REWARD_FILE = Path(__file__).with_name("letter_reward.py")


def records(run: Path) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if "policy_loss" in m]


# Every estimator runs with LoRA under ZeRO-3 and with full weights under ZeRO-2.
@pytest.mark.parametrize(("lora", "zero"), [(True, 3), (False, 2)], ids=["lora-z3", "full-z2"])
@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_pp"])
def test_estimator_two_iterations_on_two_workers(tmp_path, ray_local, estimator, lora, zero):
    cfg = tiny_ppo_config(tmp_path, f"algorithm.estimator={estimator}",
                          f"model.lora.enabled={str(lora).lower()}",
                          "distributed.num_workers=2", f"distributed.zero_stage={zero}")
    summary = PPOTrainer(cfg, show_progress=False).fit()
    run = tmp_path / "run"
    steps = records(run)
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for key in ("policy_loss", "reward", "reward_std", "kl", "entropy", "clip_ratio",
                    "completions/mean_length", "completions/clipped_ratio", "time/generate",
                    "time/score", "time/train", "rewards/format_reward/mean"):
            assert key in m and math.isfinite(m[key]), key
        assert ("value_loss" in m) == (estimator == "gae")
    assert summary["stage"] == "ppo" and summary["steps"] == 2
    assert (run / "final" / "config.json").is_file()  # embedded base: LoRA merged on save
    placement = json.loads((run / "placement.json").read_text())
    assert len(placement["policy"]) == 2
    assert ("critic" in placement) == (estimator == "gae")


def test_grpo_learns_a_simple_reward(tmp_path, ray_local):
    cfg = tiny_ppo_config(tmp_path, f"rewards=[{{spec: '{REWARD_FILE}:lowercase_share'}}]",
                          "trainer.max_steps=8", "trainer.lr=3e-2", "algorithm.kl_coef=0",
                          "rollout.prompts_per_step=8", "rollout.max_new_tokens=8",
                          "trainer.global_batch_size=32", "trainer.micro_batch_size=32",
                          "eval.max_samples=0", "task.num_eval=0")
    PPOTrainer(cfg, show_progress=False).fit()
    rewards = [m["reward"] for m in records(tmp_path / "run")]
    assert len(rewards) == 8
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards


def test_first_minibatch_ratio_is_one_on_a_model_with_dropout(tmp_path, ray_local,
                                                              dropout_model_dir):
    """Old log-probs come from eval mode, the loss forward from train mode: with dropout off
    (the ppo default) they agree, so before any update every ratio is 1. The same run checks
    that rewards receive `completion_truncated` (a reward of 1 for each completion that ended)."""
    cfg = tiny_ppo_config(tmp_path, f"model.name_or_path={dropout_model_dir('gpt2')}",
                          "trainer.max_steps=1", "trainer.global_batch_size=16",
                          "trainer.micro_batch_size=16", "eval.max_samples=0", "task.num_eval=0",
                          f"rewards=[{{spec: '{REWARD_FILE}:ended', name: ended}}]")
    PPOTrainer(cfg, show_progress=False).fit()
    (first,) = records(tmp_path / "run")  # one iteration of one minibatch: no update before it
    assert first["clip_ratio"] == 0
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["rewards/ended/mean"] == pytest.approx(1 - first["completions/clipped_ratio"])


def test_roles_on_two_nodes(tmp_path):
    """A simulated 2-node cluster: the policy and the critic land on different nodes."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        cfg = tiny_ppo_config(tmp_path, "algorithm.estimator=gae", "trainer.max_steps=1",
                              f"distributed.ray_address={cluster.address}",
                              "distributed.cpus_per_worker=1", "critic.cpus_per_worker=1")
        PPOTrainer(cfg, show_progress=False).fit()
        placement = json.loads((tmp_path / "run" / "placement.json").read_text())
        assert placement["policy"][0] != placement["critic"][0]
        assert records(tmp_path / "run")[0]["value_loss"] >= 0
    finally:
        ray.shutdown()
        cluster.shutdown()

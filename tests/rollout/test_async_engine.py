"""Asynchronous rollouts on CPU vLLM engines (`rollout.async_steps=1`): training on rollouts one
version behind learns; a sync that breaks later is caught; a killed run resumes exactly; a dead
engine or trainer rank ends the run within a minute, naming it."""

from __future__ import annotations

import time

import pytest
import ray

from align.errors import TrainingError
from align.tracking import read_metrics
from align.trainers.async_rollouts import RolloutPipeline
from align.trainers.ppo import PPOTrainer
from tests.conftest import full_only, tiny_ppo_config
from tests.rollout.test_vllm_engine import VLLM_TINY
from tests.test_resume import assert_same_metrics, comparable, interrupted_then_resumed
from tests.trainers.test_dynamic_sampling import REWARD_FILE as GROUP_REWARD_FILE
from tests.trainers.test_ppo import LEARN

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
ASYNC = [*VLLM_TINY, "rollout.vllm.colocate=false", "rollout.async_steps=1",
         "algorithm.kl_coef=0.04"]


def iterations(run) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if "policy_loss" in m]


def test_async_grpo_learns_from_rollouts_one_version_behind(tmp_path, ray_local):
    cfg = tiny_ppo_config(tmp_path, *ASYNC, *LEARN)
    summary = PPOTrainer(cfg, show_progress=False).fit()
    steps = iterations(tmp_path / "run")
    assert summary["steps"] == len(steps) == 8
    # The first rollout is sampled by the initial policy; each later one a version earlier.
    assert [m["rollout/staleness"] for m in steps] == [0] + [1] * 7
    assert max(m["rollout/staleness_max"] for m in steps) == 1
    for m in steps:
        assert m["policy_loss"] == m["policy_loss"] and m["time/wait"] >= 0  # finite, logged
    assert sum(m["time/overlap"] for m in steps) > 0  # generation ran during updates
    # Each version's probe matches the trainer; the rollouts, sampled a version earlier, lag
    # once updates began (logged, not checked).
    assert all(m["rollout/logprob_diff_mean"] < 1e-3 for m in steps)
    assert steps[-1]["rollout/stale_logprob_diff_mean"] > 1e-3
    rewards = [m["reward"] for m in steps]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards


@full_only  # the synchronous gap check runs in `make test` (tests/rollout/test_vllm_engine.py)
def test_a_sync_that_breaks_after_iteration_1_is_caught(tmp_path, ray_local, monkeypatch):
    """The engines get the initial weights and iteration 1's, then no more. Iteration 3 would
    train on a rollout of version 1, checked against the trainer's version 2 only by the
    probe of the weights the engines now hold, which stops the run. With dynamic sampling,
    each iteration's extra round is sampled by the current weights and reports so."""
    from align.rollout.vllm_engine import VLLMEngine

    update, syncs = VLLMEngine.update_weights, []

    def breaks_after_iteration_1(self):
        syncs.append(len(syncs))
        return update(self) if len(syncs) <= 2 else 0.0

    monkeypatch.setattr(VLLMEngine, "update_weights", breaks_after_iteration_1)
    cfg = tiny_ppo_config(tmp_path, *ASYNC, "trainer.max_steps=4", "trainer.lr=3e-2",
                          "rollout.vllm.max_logprob_diff=1e-4", "eval.max_samples=0",
                          "task.num_eval=0", "rollout.dynamic_sampling=true",
                          "rollout.max_resample_rounds=1",
                          f"rewards=[{{spec: '{GROUP_REWARD_FILE}:last_group_varied'}}]")
    with pytest.raises(TrainingError, match=r"iteration 3: the vllm engine's sampling "
                                            r"log-probs differ.*weight sync did not reach"):
        PPOTrainer(cfg, show_progress=False).fit()
    first, second = iterations(tmp_path / "run")
    assert first["rollout/logprob_diff_mean"] < 1e-4 and first["rollout/staleness_mean"] == 0.0
    # Round 0 was sampled a version ahead, the extra round by the current weights.
    assert second["rollout/staleness"] == 1 and second["rollout/staleness_mean"] == 0.5
    # Its gap holds one update, as a failed sync's would: logged, not checked.
    assert second["rollout/logprob_diff_mean"] < 1e-4 < second["rollout/stale_logprob_diff_mean"]


@full_only  # synchronous resumes run in `make test` (tests/test_resume.py)
def test_async_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, ray_local):
    def config():
        return tiny_ppo_config(tmp_path, *ASYNC, "trainer.max_steps=4", "trainer.save_every=2",
                               "eval.max_samples=0")
    straight = tmp_path / "straight"
    cfg = config()
    cfg.output_dir = str(straight)
    PPOTrainer(cfg, show_progress=False).fit()
    resumed = interrupted_then_resumed("ppo", config(), tmp_path, "kill-after-checkpoint:2")
    # The rollout in flight at step 2 (sampled with weights the checkpoint no longer has) was
    # saved with it, so step 3 trains on the same samples as the uninterrupted run.
    assert_same_metrics(comparable(straight), comparable(resumed))
    assert [m["rollout/staleness"] for m in iterations(resumed)] == [0, 1, 1, 1]


def kill_at_step(monkeypatch, step: int, victim) -> list[float]:
    """Kill `victim(trainer)` once iteration `step`'s rollouts are in flight; returns the time."""
    killed: list[float] = []
    fill = RolloutPipeline.fill

    def fill_then_kill(self, at, num_steps, request):
        fill(self, at, num_steps, request)
        if at == step and not killed:
            ray.kill(victim(self))
            killed.append(time.monotonic())

    monkeypatch.setattr(RolloutPipeline, "fill", fill_then_kill)
    return killed


# Each runs a full async iteration before the kill: with a critic and LoRA, and with RLOO.
@pytest.mark.parametrize(("role", "victim", "message", "setup"), [
    pytest.param("engine", lambda pipe: pipe.rollout_engine.actors[0],
                 r"vllm engine failed to generate",
                 ["algorithm.estimator=gae", "model.lora.enabled=true"], id="engine",
                 marks=full_only),  # the trainer case below runs in `make test`
    pytest.param("trainer", lambda pipe: pipe.rollout_engine.policy.actors[0],
                 r"policy worker rank 0 died", ["algorithm.estimator=rloo"], id="trainer"),
])
def test_a_dead_actor_ends_the_run_within_a_minute(tmp_path, ray_local, monkeypatch, role,
                                                  victim, message, setup):
    killed = kill_at_step(monkeypatch, 1, victim)
    cfg = tiny_ppo_config(tmp_path, *ASYNC, *setup, "trainer.max_steps=4",
                          "eval.max_samples=0")
    with pytest.raises(TrainingError, match=message):
        PPOTrainer(cfg, show_progress=False).fit()
    assert killed and time.monotonic() - killed[0] < 60, role

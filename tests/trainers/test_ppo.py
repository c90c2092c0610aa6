"""PPO-family training end to end: every estimator on 2 workers, learning, 2-node placement."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import ray
from ray import cloudpickle
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from align.metrics import combine_metrics
from align.tracking import read_metrics
from align.trainers.ppo import PPOTrainer
from reward_models.builtin import format_reward
from tests.conftest import full_only, tiny_ppo_config
from tests.trainers.letter_reward import lowercase_share

pytestmark = pytest.mark.slow
# Ray workers cannot import test modules by name; ship this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
REWARD_FILE = Path(__file__).with_name("letter_reward.py")


def records(run: Path) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if "policy_loss" in m]


class RecordedPPO(PPOTrainer):
    """Records what passes through the policy workers: (method, per-rank args, results)."""

    def build_workers(self):
        group = super().build_workers()
        self.calls: list[tuple[str, list, list]] = []
        call_each = group.call_each

        def recording(method, per_rank, **kwargs):
            results = call_each(method, per_rank, **kwargs)
            self.calls.append((method, per_rank, results))
            return results

        group.call_each = recording  # the trainer and its hf rollout engine share this group
        return group

    def rollout_completions(self) -> list[list[str]]:
        """Per iteration, the text of every sampled completion, decoded here from the tokens
        the workers returned (order aside)."""
        return [[self.tokenizer.decode(t, skip_special_tokens=True)
                 for result in results for t in result.tokens]
                for method, per_rank, results in self.calls
                if method == "generate" and per_rank[0][1].logprobs]  # rollouts, not eval

    def train_step_sums(self) -> list[dict[str, float]]:
        """Per policy minibatch, the workers' summed metrics."""
        return [combine_metrics(r["sums"] for r in results)
                for method, _, results in self.calls if method == "train_step"]


# Each estimator runs on two workers: with LoRA under ZeRO-3 for two iterations, or with full
# weights under ZeRO-2 for eight on a reward a tiny model can learn, which must rise. gae (the
# only one with a critic) runs both ways; the critic-free ones share every code path but the
# advantage function (unit-tested in test_advantages.py), so each runs one way. rloo runs with
# LoRA: its reference (the adapter off) runs inside the update's call (`old_from_update`,
# align.trainers.experience).
LEARN = (f"rewards=[{{spec: '{REWARD_FILE}:lowercase_share', name: letters}}]",
         "trainer.max_steps=8", "trainer.lr=3e-2", "rollout.prompts_per_step=8",
         "rollout.max_new_tokens=8", "trainer.global_batch_size=32",
         "trainer.micro_batch_size=16", "eval.max_samples=0", "task.num_eval=0")


@pytest.mark.parametrize(("estimator", "lora", "zero"), [
    # `make test` runs one critic case and one group case; ALIGN_TEST_FULL all five.
    pytest.param("gae", True, 3, id="gae-lora-z3"),
    pytest.param("gae", False, 2, id="gae-full-z2", marks=full_only),
    pytest.param("grpo", False, 2, id="grpo-full-z2"),
    pytest.param("rloo", True, 3, id="rloo-lora-z3", marks=full_only),
    pytest.param("reinforce_pp", False, 2, id="reinforce_pp-full-z2", marks=full_only)])
def test_estimator_on_two_workers(tmp_path, ray_local, estimator, lora, zero):
    learn = not lora
    cfg = tiny_ppo_config(tmp_path, f"algorithm.estimator={estimator}",
                          f"model.lora.enabled={str(lora).lower()}", "rollout.temperature=0.8",
                          "algorithm.kl_coef=0.04", "trainer.log_completions_every=1",
                          "distributed.num_workers=2", f"distributed.zero_stage={zero}",
                          *(LEARN if learn else ()),
                          # one minibatch of the 16 samples: the update's own old log-probs
                          *(("trainer.global_batch_size=16",) if estimator == "rloo" else ()))
    trainer = RecordedPPO(cfg, show_progress=False)
    summary = trainer.fit()
    run = tmp_path / "run"
    steps = records(run)
    iterations = 8 if learn else 2
    assert [m["step"] for m in steps] == list(range(1, iterations + 1))
    for m in steps:
        for key in ("policy_loss", "reward", "reward_std", "kl", "entropy", "clip_ratio",
                    "completions/mean_length", "completions/clipped_ratio", "time/generate",
                    "time/score", "time/train"):
            assert key in m and math.isfinite(m[key]), key
        assert ("value_loss" in m) == (estimator == "gae")
    assert summary["stage"] == "ppo" and summary["steps"] == iterations
    assert trainer.experience.old_from_update == (estimator in ("grpo", "rloo"))
    assert (run / "final" / "config.json").is_file()  # embedded base: LoRA merged on save
    placement = json.loads((run / "placement.json").read_text())
    assert len(placement["policy"]) == 2
    assert ("critic" in placement) == (estimator == "gae")

    # Before the first update the policy is the reference and the sampler: no KL, no clipping.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    first = trainer.train_step_sums()[0]
    # Per token, float noise only: the update's micro-batches group (and so pack) other rows
    # than the reference pass's did, and a packed row's attention sums in another order.
    assert first["kl_sum"] == pytest.approx(0.0, abs=1e-6 * first["tokens"])
    assert first["clip_ratio_sum"] == 0
    assert first["ratio_sum"] == pytest.approx(first["tokens"], rel=1e-5)
    # The policy has moved away from the reference since. The logged KL is gae's in-reward k1
    # estimate: unbiased, but a sample mean of it may fall below zero.
    assert abs(steps[-1]["kl"]) > 1e-6

    # Logged rewards are the reward function's values on the completions sampled.
    reward = lowercase_share if learn else format_reward
    completions = trainer.rollout_completions()
    assert len(completions) == iterations
    for m, texts in zip(steps, completions):
        assert m["reward"] == pytest.approx(sum(reward([""] * len(texts), texts)) / len(texts),
                                            abs=1e-9)
    table = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {row["step"] for row in table} == set(range(1, iterations + 1))
    for row in table:
        assert row["completion"] in completions[row["step"] - 1]
        assert row["reward"] == pytest.approx(reward([row["prompt"]], [row["completion"]])[0])
    if learn:
        rewards = [m["reward"] for m in steps]
        assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.05, rewards


def test_first_minibatch_ratio_is_one_on_a_model_with_dropout(tmp_path, ray_local,
                                                              dropout_model_dir):
    """Old log-probs come from eval mode, the loss forward from train mode: with dropout off
    (the ppo default) they agree, so before any update every ratio is 1. Two epochs, so the
    old log-probs are computed by their own forward. The same run checks that rewards receive
    `completion_truncated` (a reward of 1 for each completion that ended)."""
    cfg = tiny_ppo_config(tmp_path, f"model.name_or_path={dropout_model_dir('gpt2')}",
                          "trainer.max_steps=1", "trainer.global_batch_size=16",
                          "trainer.micro_batch_size=16", "eval.max_samples=0", "task.num_eval=0",
                          "algorithm.ppo_epochs=2",
                          f"rewards=[{{spec: '{REWARD_FILE}:ended', name: ended}}]")
    trainer = RecordedPPO(cfg, show_progress=False)
    trainer.fit()
    assert not trainer.experience.old_from_update
    first = trainer.train_step_sums()[0]  # the first minibatch: no update before it
    assert first["clip_ratio_sum"] == 0
    assert first["ratio_sum"] == pytest.approx(first["tokens"], rel=1e-6)
    (logged,) = records(tmp_path / "run")
    assert logged["rewards/ended/mean"] == pytest.approx(1 - logged["completions/clipped_ratio"])


def test_token_budget_micro_batches_train_as_fixed_ones(tmp_path, ray_local):
    """`trainer.max_tokens_per_micro_batch` on padded rows (cut to each micro-batch's longest)
    gives the first update of fixed micro-batches, old log-probs by their own forward and
    the critic's values included, in a different number of micro-batches."""
    def run(name, *extra):
        cfg = tiny_ppo_config(tmp_path / name, "trainer.max_steps=1", "algorithm.ppo_epochs=2",
                              "algorithm.estimator=gae", "trainer.global_batch_size=16",
                              "trainer.micro_batch_size=8", "data.packing=false",
                              "rollout.max_new_tokens=8", "eval.max_samples=0",
                              "task.num_eval=0", *extra)
        trainer = RecordedPPO(cfg, show_progress=False)
        trainer.fit()
        counts = {len(per_rank[0][1]) for method, per_rank, _ in trainer.calls
                  if method == "train_step"}
        return counts, records(tmp_path / name / "run")[0]

    fixed_counts, fixed = run("fixed")
    counts, budget = run("budget", "trainer.max_tokens_per_micro_batch=60")
    assert fixed_counts == {2} and counts - {2}  # other splits than two of 8
    for key in ("policy_loss", "value_loss", "kl", "entropy", "grad_norm", "ratio"):
        assert budget[key] == pytest.approx(fixed[key], rel=1e-4, abs=1e-6), key


class FullExperiencePPO(RecordedPPO):
    """Computes the old log-probs by their own forward even where the update could."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.experience.old_from_update = False


def test_one_update_per_rollout_takes_old_logprobs_from_the_update(tmp_path, ray_local):
    """With one minibatch and one epoch the old log-probs are the update's own forward and the
    reference runs in the same call: one forward pass and one call fewer per iteration, and the
    same training, metrics and engine gap check."""
    def run(cls, name):
        cfg = tiny_ppo_config(tmp_path / name, "algorithm.estimator=grpo",
                              "algorithm.kl_coef=0.04", "trainer.max_steps=3",
                              "trainer.global_batch_size=16", "trainer.lr=3e-2",
                              "eval.max_samples=0", "task.num_eval=0")
        trainer = cls(cfg, show_progress=False)
        trainer.fit()
        infers = [per_rank for method, per_rank, _ in trainer.calls if method == "infer"]
        return trainer, infers, records(tmp_path / name / "run")

    shortcut, infers, steps = run(RecordedPPO, "shortcut")
    full, full_infers, full_steps = run(FullExperiencePPO, "full")
    assert shortcut.experience.old_from_update
    # No separate forward at all: the reference runs in the update's call, against the
    # reference and old log-probs by their own calls.
    assert not infers and len(full_infers) == 6
    for m, f in zip(steps, full_steps, strict=True):
        for key in ("policy_loss", "kl", "reward", "entropy", "grad_norm", "ratio"):
            assert m[key] == pytest.approx(f[key], rel=1e-4, abs=1e-6), key
        assert m["rollout/logprob_diff_mean"] < 1e-5
        assert m["rollout/logprob_diff_max"] >= m["rollout/logprob_diff_mean"]
    assert steps[-1]["kl"] > 1e-6  # the policy moved: the comparison is not of zeros


@full_only  # placement over one node runs in every end-to-end test of `make test`
def test_roles_on_two_nodes(tmp_path, monkeypatch):
    """A simulated 2-node cluster: the policy and the critic land on different nodes. The
    workers reach the code only as the run ships it (not through the driver's directory or
    PYTHONPATH), as on a real second node."""
    ray.shutdown()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
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
        for node in (placement["policy"][0], placement["critic"][0]):
            strategy = NodeAffinitySchedulingStrategy(node, soft=False)
            origin = ray.get(code_origin.options(scheduling_strategy=strategy).remote())
            assert "runtime_resources/py_modules_files" in origin
    finally:
        ray.shutdown()
        cluster.shutdown()


@ray.remote(num_cpus=0)
def code_origin() -> str:
    """Where a process of this run on some node imports align from."""
    import align

    return align.__file__

"""`align quickstart` wiring: every stage runs from the shipped configs, each wired to the
previous stages' outputs (shrunk here to a tiny model and two steps per stage)."""

from __future__ import annotations

import json

import pytest

from align.quickstart import PIPELINE, accuracies, run_quickstart, story_violations
from reward_models.builtin import exact_match
from tests.conftest import TINY, full_only


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path, ray_local):
    shrink = [*(f"model.embedded.{k}={v}" for k, v in TINY.items()),
              "trainer.max_steps=2", "trainer.global_batch_size=16",
              "trainer.micro_batch_size=16", "trainer.eval_every=0", "trainer.save_every=0",
              "trainer.log_every=1",
              "task.num_train=400", "task.num_pairs=200", "task.num_eval=16",
              "eval.max_samples=16", "grpo:rollout.prompts_per_step=4",
              "ppo_rm:rollout.prompts_per_step=8", "ppo_rm:trainer.log_completions_every=1"]
    summaries = run_quickstart(str(tmp_path), overrides=shrink, quiet=True)
    assert [s["run"] for s in summaries] == [name for name, *_ in PIPELINE]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == summaries
    table = (tmp_path / "report.md").read_text()
    for name, *_ in PIPELINE:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert {"run": name, **summary} in summaries
        assert f"| {name} | {summary['stage']} | {100 * summary['eval/accuracy']:.1f}% (" in table
        assert (tmp_path / name / "final").is_dir()
    # ppo_rm optimises the reward model (the proxy) and logs the exact-match gold beside it.
    ppo_rm = [json.loads(line) for line in (tmp_path / "ppo_rm" / "metrics.jsonl").open()]
    iterations = [m for m in ppo_rm if "reward" in m]
    assert len(iterations) == 2
    for m in iterations:
        assert m["reward/proxy"] == m["reward"]
    samples = [json.loads(line) for line in (tmp_path / "ppo_rm" / "completions.jsonl").open()]
    assert samples
    for step in {row["step"] for row in samples}:
        # Learned rewards only, normalised and clipped: within an iteration the trained-on
        # reward is an increasing function of the reward model's raw score.
        rows = sorted((r for r in samples if r["step"] == step),
                      key=lambda r: r["rewards/reward_model"])
        shaped = [r["reward"] for r in rows]
        assert all(-3.0 <= v <= 3.0 for v in shaped)
        assert shaped == sorted(shaped)
    for row in samples:
        a, b = map(int, row["prompt"].removeprefix("Q: ").removesuffix("=").split("+"))
        assert row["reward/gold"] == exact_match([row["prompt"]], [row["completion"]],
                                                 answer=[str(a + b)])[0]


def test_overrides_can_be_scoped_to_one_run():
    from align.errors import ConfigError
    from align.recipe import scoped_overrides

    items = ["trainer.lr=1e-3", "grpo:rollout.prompts_per_step=4", "rm:task.num_pairs=10"]
    assert scoped_overrides(items, "grpo") == ["trainer.lr=1e-3", "rollout.prompts_per_step=4"]
    assert scoped_overrides(items, "sft") == ["trainer.lr=1e-3"]
    assert scoped_overrides(["rewards.0.spec=a.b:c"], "sft") == ["rewards.0.spec=a.b:c"]
    with pytest.raises(ConfigError, match="not a run of this recipe"):
        scoped_overrides(["nope:trainer.lr=1"], "sft", runs=[n for n, *_ in PIPELINE])


@full_only
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_shipped_quickstart_tells_its_story(tmp_path, ray_local):
    """The quickstart as `make quickstart` runs it (no override): SFT on its plateau, a reward
    model that checks the carry, and GRPO, PPO-RM and DPO far above SFT on this machine."""
    summaries = run_quickstart(str(tmp_path), quiet=True)
    assert story_violations(accuracies(summaries)) == []


def test_story_bounds_name_each_break():
    held = {"sft": 0.6, "rm": 0.97, "grpo": 0.9, "ppo_rm": 0.85, "dpo": 0.99}
    assert story_violations(held) == []
    assert story_violations({**held, "grpo": 0.849}) == [
        "grpo 84.9% is less than 25 points above sft's 60.0%"]
    assert story_violations({**held, "ppo_rm": 0.85, "sft": 0.6}) == []  # exactly 25 points
    assert story_violations({**held, "sft": 0.06, "rm": 0.83}) == [
        "sft 6.0% is outside its plateau 40-75%", "rm 83.0% pairwise is below 95%"]
    assert story_violations({**held, "sft": 0.76})[0] == "sft 76.0% is outside its plateau 40-75%"

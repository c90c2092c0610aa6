"""`align quickstart` wiring: every stage runs from the shipped configs, each wired to the
previous stages' outputs (shrunk here to a tiny model and two steps per stage)."""

from __future__ import annotations

import json

import pytest

from align.quickstart import PIPELINE, run_quickstart
from reward_models.builtin import exact_match
from tests.conftest import TINY


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

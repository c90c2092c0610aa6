"""`align quickstart` wiring: every stage runs from the shipped configs, each wired to the
previous stages' outputs (shrunk here to a tiny model and two steps per stage)."""

from __future__ import annotations

import json

import pytest

from align.quickstart import PIPELINE, run_quickstart
from tests.conftest import TINY


@pytest.mark.slow
def test_quickstart_runs_every_stage(tmp_path, ray_local):
    shrink = [*(f"model.embedded.{k}={v}" for k, v in TINY.items()),
              "trainer.max_steps=2", "trainer.global_batch_size=16",
              "trainer.micro_batch_size=16", "trainer.eval_every=0", "trainer.save_every=0",
              "task.num_train=400", "task.num_pairs=200", "task.num_eval=16",
              "eval.max_samples=16", "grpo:rollout.prompts_per_step=4",
              "ppo_rm:rollout.prompts_per_step=4"]
    summaries = run_quickstart(str(tmp_path), overrides=shrink, quiet=True)
    assert [s["run"] for s in summaries] == [name for name, *_ in PIPELINE]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == summaries
    table = (tmp_path / "report.md").read_text()
    for name, *_ in PIPELINE:
        assert f"| {name} |" in table
        assert (tmp_path / name / "final").is_dir()
    ppo_rm = [json.loads(line) for line in (tmp_path / "ppo_rm" / "metrics.jsonl").open()]
    assert all("reward/gold" in m and "reward/proxy" in m for m in ppo_rm if "reward" in m)


def test_overrides_can_be_scoped_to_one_run():
    from align.errors import ConfigError
    from align.recipe import scoped_overrides

    items = ["trainer.lr=1e-3", "grpo:rollout.prompts_per_step=4", "rm:task.num_pairs=10"]
    assert scoped_overrides(items, "grpo") == ["trainer.lr=1e-3", "rollout.prompts_per_step=4"]
    assert scoped_overrides(items, "sft") == ["trainer.lr=1e-3"]
    assert scoped_overrides(["rewards.0.spec=a.b:c"], "sft") == ["rewards.0.spec=a.b:c"]
    with pytest.raises(ConfigError, match="not a run of this recipe"):
        scoped_overrides(["nope:trainer.lr=1"], "sft", runs=[n for n, *_ in PIPELINE])

"""The task interface: `data.train: embedded` resolves through `load_task`, and stage rows
come out in each stage's shape, held out from training."""

from __future__ import annotations

import pytest

from align.config import SFTConfig, TaskConfig, load_config
from align.errors import ConfigError
from align.tasks import TASKS, load_task
from align.trainers.stage_data import stage_evaluator, stage_rows


def test_stage_rows_come_from_the_configured_task():
    cfg = load_config(SFTConfig, overrides=["task.num_train=50", "task.num_eval=20",
                                            "task.num_pairs=30"])
    sft = stage_rows(cfg, "sft")
    assert len(sft.train) == 50 and len(sft.held_out) == 20
    assert set(sft.held_out[0]) == {"prompt", "completion"}
    prefs = stage_rows(cfg, "preference")
    assert len(prefs.train) == 30 and set(prefs.train[0]) == {"prompt", "chosen", "rejected"}
    rl = stage_rows(cfg, "rl")
    assert set(rl.held_out[0]) == {"prompt", "answer"}
    held = {r["prompt"] for r in rl.held_out}
    assert held.isdisjoint(r["prompt"] for r in rl.train)
    # the SFT reference completion of a held-out prompt is the task's correct answer
    task = load_task(cfg.task)
    first = rl.held_out[0]
    assert sft.held_out[0] == {"prompt": first["prompt"],
                               "completion": task.reference_completion(first["answer"])}
    assert task.is_correct(sft.held_out[0]["completion"], first["answer"])
    assert stage_evaluator(cfg).__func__ is type(task).is_correct


def test_task_settings_reach_the_rows():
    a = load_task(TaskConfig(seed=1, num_eval=10)).held_out_rows()
    b = load_task(TaskConfig(seed=2, num_eval=10)).held_out_rows()
    assert a != b


def test_unknown_task_is_a_config_error():
    assert "arithmetic" in TASKS
    with pytest.raises(ConfigError, match="task.name"):
        load_task(TaskConfig(name="nope"))

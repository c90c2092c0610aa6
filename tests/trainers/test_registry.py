"""The stage table: every stage's trainer class and schema are found by its name."""

from __future__ import annotations

import pytest

from align.trainers.base import Trainer
from align.trainers.registry import STAGES, load_stage_config, trainer_class


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_resolves_to_its_trainer_and_schema(stage):
    trainer = trainer_class(stage)
    assert issubclass(trainer, Trainer)
    assert trainer.stage == stage
    cfg = load_stage_config(stage, overrides=["rewards=[{spec: m:f}]"] if stage == "ppo" else [])
    assert type(cfg) is STAGES[stage].config_class

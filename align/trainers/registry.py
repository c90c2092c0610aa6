"""The stages, registered once: CLI name -> config schema and trainer class.

Trainer modules are imported on first use, so reading the table (the CLI's sub-commands, the
config test) does not pay for torch, DeepSpeed and Ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.config import DPOConfig, PPOConfig, RMConfig, RunConfig, SFTConfig, load_config


@dataclass(frozen=True)
class Stage:
    config_class: type[RunConfig]  # the schema its YAML is read into
    trainer: str  # "module:Class" of its Trainer


STAGES: dict[str, Stage] = {
    "sft": Stage(SFTConfig, "align.trainers.sft:SFTTrainer"),
    "rm": Stage(RMConfig, "align.trainers.reward:RewardTrainer"),
    "dpo": Stage(DPOConfig, "align.trainers.dpo:DPOTrainer"),
    "ppo": Stage(PPOConfig, "align.trainers.ppo:PPOTrainer"),
}


def trainer_class(stage: str) -> Any:
    """The Trainer subclass of `stage`."""
    module, _, name = STAGES[stage].trainer.partition(":")
    return getattr(importlib.import_module(module), name)


def load_stage_config(stage: str, path: str | Path | None = None,
                      overrides: list[str] | None = None) -> RunConfig:
    """`stage`'s config from a YAML file and `key=value` overrides (see load_config)."""
    return load_config(STAGES[stage].config_class, path, overrides)


def run_stage(stage: str, cfg: RunConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train `stage` end to end; returns its summary (as written to summary.json)."""
    return trainer_class(stage)(cfg, show_progress=show_progress).fit()

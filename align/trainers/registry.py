"""Stage name -> trainer class, as the CLI and recipes look them up."""

from __future__ import annotations

from align.trainers.dpo import DPOTrainer
from align.trainers.ppo import PPOTrainer
from align.trainers.reward import RewardTrainer
from align.trainers.sft import SFTTrainer

TRAINERS = {"sft": SFTTrainer, "rm": RewardTrainer, "dpo": DPOTrainer, "ppo": PPOTrainer}

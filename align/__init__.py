"""align: an RLHF alignment toolkit (SFT, reward models, DPO, PPO) on Ray and DeepSpeed."""

__version__ = "0.1.0"

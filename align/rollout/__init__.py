"""Rollout engines: the one way PPO-family rollouts and held-out evaluation generate.

Backends: `hf` (the policy workers' own `generate`, align.rollout.hf) and `vllm` (vLLM engines
as Ray actors, align.rollout.vllm_engine). `build_engine` (align.rollout.factory) picks one
from the config. This package's top level imports nothing heavy, so the policy can use it.
"""

from align.rollout.base import Generation, RolloutEngine, Sampling, cut_at_eos

__all__ = ["Generation", "RolloutEngine", "Sampling", "cut_at_eos"]

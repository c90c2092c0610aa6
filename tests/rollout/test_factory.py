"""Choosing the engine and checking `rollout.vllm` sizes before any actor starts."""

from __future__ import annotations

import pytest

from align.config import PPOConfig, load_config
from align.errors import ConfigError
from align.rollout.factory import AUTO_ENGINE, engine_name, separate_engine
from align.trainers.experience import importance_cap

BASE = ["rewards=[{spec: 'reward_models.builtin:format_reward'}]"]


def ppo(*overrides: str) -> PPOConfig:
    return load_config(PPOConfig, None, [*BASE, *overrides])


def test_auto_picks_the_measured_default_for_this_device(ray_local):
    assert engine_name(ppo()) == AUTO_ENGINE["cpu"]
    assert engine_name(ppo("rollout.engine=hf")) == "hf"
    assert engine_name(ppo("rollout.engine=vllm")) == "vllm"
    assert separate_engine(ppo("rollout.engine=vllm", "rollout.vllm.colocate=false"))
    assert not separate_engine(ppo("rollout.engine=hf", "rollout.vllm.colocate=false"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["rollout.vllm.tensor_parallel_size=2"], "colocate=true places one engine"),
    (["rollout.vllm.num_engines=2"], "num_engines=2 exceeds"),
    (["rollout.vllm.gpu_memory_utilization=1.5"], "gpu_memory_utilization"),
    (["rollout.vllm.max_logprob_diff=0"], "max_logprob_diff must be positive"),
    (["algorithm.tis_cap=0.5"], "tis_cap must be at least 1"),
    (["rollout.engine=sglang"], "rollout.engine"),
    (["rollout.async_steps=-1"], "rollout.async_steps must be >= 0"),
    (["rollout.timeout_s=0"], "rollout.timeout_s must be positive"),
    (["rollout.async_steps=1"], "needs engines of their own"),  # colocated by default
    (["rollout.async_steps=1", "rollout.engine=hf", "rollout.vllm.colocate=false"],
     "set rollout.engine=vllm"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ppo(*overrides)


def test_async_rollouts_resolve_to_separate_vllm_engines_with_a_behaviour_cap(ray_local):
    cfg = ppo("rollout.async_steps=1", "rollout.vllm.colocate=false")
    assert engine_name(cfg) == "vllm" and separate_engine(cfg)  # auto: vLLM even on CPU
    assert importance_cap(cfg) == 2.0  # decoupled PPO's correction, on by default
    assert importance_cap(ppo("rollout.async_steps=1", "rollout.vllm.colocate=false",
                              "algorithm.tis_cap=1.5")) == 1.5
    assert importance_cap(ppo()) is None

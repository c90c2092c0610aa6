"""Choosing the engine and checking `rollout.vllm` sizes before any actor starts."""

from __future__ import annotations

import pytest

from align.config import PPOConfig, load_config
from align.errors import ConfigError
from align.rollout.factory import AUTO_ENGINE, engine_name, separate_engine

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
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ppo(*overrides)

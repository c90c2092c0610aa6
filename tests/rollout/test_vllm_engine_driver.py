"""The `vllm` engine's driver side without vLLM or a GPU: where each engine actor is placed.

The engine object is built without `__init__` (which would start actors) and given the state a
GPU cluster would give it; Ray's placement calls are replaced by recording fakes, so the code
under test is `VLLMEngine`'s own.
"""

from __future__ import annotations

from typing import Any

import pytest

from align.config import VLLMSettings
from align.rollout import vllm_engine
from align.rollout.vllm_engine import VLLMEngine


class FakePlacementGroup:
    """Stands in for a Ray placement group: records its bundles, is ready at once."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str) -> None:
        self.bundles, self.strategy = bundles, strategy

    def ready(self) -> None:
        return None


def driver(settings: VLLMSettings, on_gpu: bool = True, colocated: bool = False) -> VLLMEngine:
    """A VLLMEngine as `__init__` leaves it before starting actors."""
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.settings, engine.concurrent = settings, False
    engine.on_gpu, engine.colocated = on_gpu, colocated
    engine.transport = "nccl" if on_gpu and not colocated else "object_store"
    engine.policy, engine._pg, engine.actors = None, None, []
    return engine


@pytest.fixture()
def fake_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_engine, "placement_group", FakePlacementGroup)
    monkeypatch.setattr(vllm_engine, "node_cpus", lambda: 4.0)
    monkeypatch.setattr(vllm_engine.ray, "get", lambda *args, **kwargs: None)


def bundle_indices(options: dict[str, Any]) -> str:
    return options["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"]


def test_tensor_parallel_engines_each_get_their_own_bundles(fake_placement):
    engine = driver(VLLMSettings(num_engines=3, tensor_parallel_size=2, colocate=False))
    placements = engine._placements(None)
    assert len(engine._pg.bundles) == 6
    assert [bundle_indices(options) for options, _ in placements] == ["0,1", "2,3", "4,5"]
    for options, extra in placements:
        assert extra == {"distributed_executor_backend": "ray"}
        assert options["num_gpus"] == 0  # vLLM's own workers take the GPUs of the bundles
    # Editing one engine's environment leaves the others' alone.
    envs = [options["runtime_env"]["env_vars"] for options, _ in placements]
    assert len({id(env) for env in envs}) == 3


def test_single_gpu_engines_set_no_bundle_indices(fake_placement):
    engine = driver(VLLMSettings(num_engines=2, colocate=False))
    placements = engine._placements(None)
    for i, (options, extra) in enumerate(placements):
        assert "VLLM_RAY_BUNDLE_INDICES" not in options["runtime_env"]["env_vars"]
        assert options["num_gpus"] == 1 and extra == {}
        assert options["scheduling_strategy"].placement_group_bundle_index == i

"""The `vllm` engine's driver side without vLLM or a GPU: where each engine actor is placed,
and the order colocated engines sleep, wake and sync in.

The engine object is built without `__init__` (which would start actors) and given the state a
GPU cluster would give it. Ray's calls are replaced by fakes that run at once in this process,
and `vllm.LLM` and `torch.cuda.empty_cache` by recorders, so the code under test is the real
driver, engine actor, policy worker and weight sync.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from align.config import VLLMSettings
from align.distributed.worker import PolicyWorker
from align.rollout import vllm_engine
from align.rollout.base import Sampling
from align.rollout.vllm_actor import VLLMEngineActor
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
    engine._memory = "awake"
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


# ---------------------------------------------------------------- colocated sleep and wake


class RecordingLLM:
    """Stands in for `vllm.LLM` inside a real VLLMEngineActor: logs what the engine is asked."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log

    def sleep(self, level: int) -> None:
        self.log.append(("engine", "sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.log.append(("engine", "wake_up", tags))

    def collective_rpc(self, method: Any, args: tuple = ()) -> None:
        self.log.append(("engine", "load", [name for name, _ in args[0]]))

    def reset_prefix_cache(self) -> None:
        self.log.append(("engine", "reset_prefix_cache"))


class LocalActor:
    """A Ray actor handle over an object in this process: `.method.remote()` runs it at once."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return SimpleNamespace(remote=getattr(self._target, name))


class LocalGroup:
    """The policy's WorkerGroup as one real PolicyWorker (rank 0) in this process."""

    def __init__(self, worker: PolicyWorker, log: list[tuple]) -> None:
        self.worker, self.log = worker, log

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        self.log.append(("policy", method))
        return [getattr(self.worker, method)(*args, **kwargs)]


@pytest.fixture()
def colocated(monkeypatch: pytest.MonkeyPatch) -> tuple[VLLMEngine, list[tuple]]:
    """A colocated GPU engine (one actor) bound to a one-rank policy holding a tiny model."""
    log: list[tuple] = []
    monkeypatch.setattr(vllm_engine.ray, "get", lambda refs, **kwargs: refs)
    monkeypatch.setattr(vllm_engine.ray, "put", lambda value: value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append(("cuda", "empty_cache")))
    actor = VLLMEngineActor.__new__(VLLMEngineActor)
    actor.llm, actor.version = RecordingLLM(log), 0
    worker = PolicyWorker.__new__(PolicyWorker)
    worker.rank, worker.world_size = 0, 1
    worker.policy = SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(2, 2)),
                                    zero_stage=0)
    engine = driver(VLLMSettings(), on_gpu=True, colocated=True)
    engine.actors, engine.policy = [LocalActor(actor)], LocalGroup(worker, log)
    return engine, log


def test_colocated_engine_wakes_weights_then_syncs_then_wakes_kv_cache(colocated):
    engine, log = colocated
    engine.sleep()
    assert log == [("engine", "sleep", 2)]  # the weights are discarded, not kept on the host
    log.clear()
    engine.wake()
    engine.update_weights()
    assert log == [
        ("policy", "empty_cache"), ("cuda", "empty_cache"),  # the trainer's cached blocks
        ("cuda", "empty_cache"), ("engine", "wake_up", ["weights"]),
        ("policy", "send_weights"), ("engine", "load", ["0.weight", "0.bias"]),
        ("engine", "reset_prefix_cache"),
        ("cuda", "empty_cache"), ("engine", "wake_up", ["kv_cache"])]


def test_colocated_engine_refuses_to_generate_before_the_sync(colocated):
    engine, log = colocated
    engine.sleep()
    with pytest.raises(RuntimeError, match="generate while asleep"):
        engine.submit([[1, 2]], Sampling(max_new_tokens=4))
    engine.wake()
    with pytest.raises(RuntimeError, match="generate while weights"):
        engine.submit([[1, 2]], Sampling(max_new_tokens=4))


def test_empty_cache_only_where_cuda_is(monkeypatch):
    from align.rollout.vllm_actor import empty_gpu_cache

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    empty_gpu_cache()
    assert calls == []

"""GPU paths of the `vllm` engine: NCCL weight broadcast to separate engines, tensor-parallel
engines (each on GPUs of its own), and colocated engines that sleep while the trainer runs.
Skipped without a GPU (or without as many GPUs as a test needs)."""

from __future__ import annotations

import pytest

from align.tracking import read_metrics
from align.trainers.ppo import PPOTrainer
from tests.conftest import tiny_ppo_config

pytest.importorskip("vllm")
pytestmark = [pytest.mark.gpu, pytest.mark.slow]
# The policy on a GPU too (tiny_ppo_config keeps it on the CPU): colocated engines share its
# bundle's GPU, and the NCCL sync sends from its GPU.
GPU_TINY = ["model.embedded.hidden_size=128", "model.embedded.num_heads=2",
            "model.embedded.intermediate_size=128", "rollout.engine=vllm",
            "model.dtype=float32", "rollout.vllm.gpu_memory_utilization=0.2",
            "distributed.gpus_per_worker=1"]


def needs_gpus(count: int, why: str) -> None:
    import torch

    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs: {why}")


def gaps(run) -> list[float]:
    return [m["rollout/logprob_diff_mean"] for m in read_metrics(run / "metrics.jsonl")
            if "policy_loss" in m]


@pytest.mark.parametrize("zero", [0, 3])
def test_separate_engine_synced_over_nccl(tmp_path, ray_local, zero):
    needs_gpus(2, "one policy worker and a separate engine")
    cfg = tiny_ppo_config(tmp_path, *GPU_TINY, "rollout.vllm.colocate=false",
                          f"distributed.zero_stage={zero}", "rollout.vllm.sync_bucket_mb=0.1")
    PPOTrainer(cfg, show_progress=False).fit()
    values = gaps(tmp_path / "run")
    assert len(values) == 2 and max(values) < 1e-2, values


def test_colocated_engine_sleeps_and_wakes(tmp_path, ray_local):
    cfg = tiny_ppo_config(tmp_path, *GPU_TINY, "rollout.vllm.colocate=true")
    PPOTrainer(cfg, show_progress=False).fit()
    assert max(gaps(tmp_path / "run")) < 1e-2


def test_tensor_parallel_engine(tmp_path, ray_local):
    needs_gpus(3, "one policy worker and a 2-way tensor-parallel engine")
    cfg = tiny_ppo_config(tmp_path, *GPU_TINY, "rollout.vllm.colocate=false",
                          "rollout.vllm.tensor_parallel_size=2")
    PPOTrainer(cfg, show_progress=False).fit()
    assert max(gaps(tmp_path / "run")) < 1e-2


@pytest.mark.timeout(300)  # engines sent to the same bundles wait for their GPUs forever
def test_tensor_parallel_engines_run_on_distinct_gpus(tmp_path, ray_local):
    import ray
    import torch

    from align.model_loading import load_tokenizer
    from align.rollout.factory import build_engine

    needs_gpus(4, "two 2-way tensor-parallel engines")
    cfg = tiny_ppo_config(tmp_path, *GPU_TINY, "rollout.vllm.colocate=false",
                          "rollout.vllm.num_engines=2", "rollout.vllm.tensor_parallel_size=2")
    engine = build_engine(cfg, load_tokenizer(cfg.model), None)
    try:
        # Each engine asks its tensor-parallel workers which physical GPU they run on.
        per_engine = ray.get([actor.__ray_call__.remote(lambda a: a.llm.collective_rpc(
            lambda worker: str(torch.cuda.get_device_properties(worker.device).uuid)))
            for actor in engine.actors])
    finally:
        engine.shutdown()
    gpus = [uuid for workers in per_engine for uuid in workers]
    assert len(gpus) == 4 and len(set(gpus)) == 4, per_engine


def test_colocated_engine_takes_its_kv_cache_back_after_the_sync(tmp_path, ray_local):
    """wake() brings back the weights alone; the KV cache returns after the sync, and the
    weights discarded at sleep (level 2) are the policy's again once it has run."""
    import ray
    import torch

    from align.distributed import PolicyWorker, WorkerGroup
    from align.model_loading import load_tokenizer
    from align.rollout import Sampling
    from align.rollout.factory import build_engine, policy_gpu_share

    cfg = tiny_ppo_config(tmp_path, *GPU_TINY, "rollout.vllm.colocate=true",
                          "distributed.num_workers=1")
    group = WorkerGroup(PolicyWorker, cfg.distributed, gpu_share=policy_gpu_share(cfg))
    engine = None
    try:
        group.call("setup", model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                   dist_cfg=cfg.distributed, total_steps=1)
        engine = build_engine(cfg, load_tokenizer(cfg.model), group)
        engine.update_weights()
        prompts, greedy = [[5, 6, 7], [8, 9]], Sampling(max_new_tokens=8, greedy=True,
                                                         logprobs=True)
        before = engine.generate(prompts, greedy)

        def free_bytes() -> int:  # free memory of the GPU, seen from the engine's process
            return ray.get(engine.actors[0].__ray_call__.remote(
                lambda actor: torch.cuda.mem_get_info()[0]))

        engine.sleep()
        asleep = free_bytes()
        engine.wake()
        weights_back = asleep - free_bytes()
        engine.update_weights()
        all_back = asleep - free_bytes()
        after = engine.generate(prompts, greedy)
    finally:
        if engine is not None:
            engine.shutdown()
        group.shutdown()
    # The KV cache (most of gpu_memory_utilization) is taken only after the sync.
    assert 0 <= weights_back < 0.5 * all_back, (weights_back, all_back)
    assert after.tokens == before.tokens
    gaps = [abs(a - b) for x, y in zip(after.logprobs, before.logprobs) for a, b in zip(x, y)]
    assert max(gaps) < 1e-4, gaps

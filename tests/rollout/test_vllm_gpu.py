"""GPU paths of the `vllm` engine: NCCL weight broadcast to separate engines, tensor-parallel
engines, and colocated engines that sleep while the trainer runs. Skipped without a GPU."""

from __future__ import annotations

import pytest

from align.tracking import read_metrics
from align.trainers.ppo import PPOTrainer
from tests.conftest import tiny_ppo_config

pytest.importorskip("vllm")
pytestmark = [pytest.mark.gpu, pytest.mark.slow]
GPU_TINY = ["model.embedded.hidden_size=128", "model.embedded.num_heads=2",
            "model.embedded.intermediate_size=128", "rollout.engine=vllm",
            "model.dtype=float32", "rollout.vllm.gpu_memory_utilization=0.2"]


def gaps(run) -> list[float]:
    return [m["rollout/logprob_diff_mean"] for m in read_metrics(run / "metrics.jsonl")
            if "policy_loss" in m]


@pytest.mark.parametrize("zero", [0, 3])
def test_separate_engine_synced_over_nccl(tmp_path, ray_local, zero):
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
    import torch

    if torch.cuda.device_count() < 3:
        pytest.skip("needs 3 GPUs: one policy worker and a 2-way tensor-parallel engine")
    cfg = tiny_ppo_config(tmp_path, *GPU_TINY, "rollout.vllm.colocate=false",
                          "rollout.vllm.tensor_parallel_size=2")
    PPOTrainer(cfg, show_progress=False).fit()
    assert max(gaps(tmp_path / "run")) < 1e-2

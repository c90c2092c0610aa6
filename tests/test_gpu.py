"""On a GPU host: `dtype: auto` is bf16, a stage trains on a GPU worker (nccl), and a frozen
reference sits on the GPU beside the trained model.

Other test sessions hide the GPU (see conftest); run these with `ALIGN_TEST_GPU=1 pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from align.model_loading import resolve_dtype
from align.tracking import read_metrics
from align.trainers.dpo import DPOTrainer
from align.trainers.ppo import PPOTrainer
from align.trainers.sft import SFTTrainer
from tests.conftest import tiny_dpo_config, tiny_ppo_config, tiny_sft_config

pytestmark = pytest.mark.gpu


def test_auto_dtype_is_bf16_where_supported():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto") == expected


@pytest.mark.slow
def test_sft_trains_on_one_gpu_worker(tmp_path, ray_local):
    cfg = tiny_sft_config(tmp_path, "model.dtype=auto", "distributed.gpus_per_worker=1",
                          "trainer.max_steps=12", "eval.exact_match=false")
    SFTTrainer(cfg, show_progress=False).fit()
    losses = [m["loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 12 and losses[-1] < losses[0], losses


def parameter_placement(module: torch.nn.Module, batch: dict) -> list[tuple[str, str]]:
    """Worker side: the (device type, dtype) pairs of the module `infer` hands over."""
    return sorted({(p.device.type, str(p.dtype)) for p in module.parameters()})


class InspectedPlacement:
    """Mixed into a trainer: after the last evaluation, before the workers stop, where the
    trained model's and the reference's parameters live on every rank."""

    def evaluate(self, final: bool) -> dict[str, float]:
        metrics = super().evaluate(final)
        if final:
            self.placement = {
                role: [batches[0] for batches in self.group.call(
                    "infer", parameter_placement, [{}], reference=role == "reference")]
                for role in ("policy", "reference")}
        return metrics


class InspectedPPO(InspectedPlacement, PPOTrainer):
    pass


class InspectedDPO(InspectedPlacement, DPOTrainer):
    pass


ON_ONE_GPU = ("model.dtype=auto", "distributed.gpus_per_worker=1", "distributed.zero_stage=0",
              "model.lora.enabled=false")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "dpo"])
def test_the_reference_runs_on_the_gpu_without_lora(tmp_path, ray_local, stage):
    """docs/gpu.md's one-GPU setup (ZeRO 0, no LoRA): the reference is a second copy of the
    model, and must sit on the GPU beside the trained one, in its dtype. PPO (one update per
    rollout) runs it inside the update's call, DPO without precomputed log-probs in a pass of
    its own before each step: the two ways a Policy hands its reference out."""
    if stage == "dpo":
        trainer = InspectedDPO(tiny_dpo_config(tmp_path, *ON_ONE_GPU, "trainer.max_steps=2",
                                               "dpo.precompute_reference=false"),
                               show_progress=False)
    else:  # a rollout is 16 samples: one minibatch
        trainer = InspectedPPO(tiny_ppo_config(tmp_path, *ON_ONE_GPU,
                                               "trainer.global_batch_size=16"),
                               show_progress=False)
        assert trainer.experience.old_from_update
    trainer.fit()
    dtype = str(resolve_dtype("auto"))
    assert trainer.placement == {"policy": [[("cuda", dtype)]],
                                 "reference": [[("cuda", dtype)]]}

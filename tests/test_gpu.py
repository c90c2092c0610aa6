"""On a GPU host: `dtype: auto` is bf16 and a stage trains on a GPU worker (nccl).

Other test sessions hide the GPU (see conftest); run these with `ALIGN_TEST_GPU=1 pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from align.model_loading import resolve_dtype
from align.tracking import read_metrics
from align.trainers.sft import SFTTrainer
from tests.conftest import tiny_sft_config

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

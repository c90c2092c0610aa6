"""SFT end to end through Ray workers and DeepSpeed: outputs, sharding parity, ZeRO-3 + LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from align.tracking import read_metrics
from align.trainers.sft import SFTTrainer
from tests.conftest import tiny_sft_config

pytestmark = pytest.mark.slow


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def test_run_outputs_and_learning(tmp_path, ray_local):
    cfg = tiny_sft_config(tmp_path, "trainer.max_steps=12", "trainer.save_every=5",
                          "trainer.keep_last=2")
    summary = SFTTrainer(cfg, show_progress=False).fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval_samples.jsonl"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-12"]
    assert json.loads((run / "summary.json").read_text()) == summary
    for key in ("stage", "steps", "wall_seconds", "samples_per_second", "eval/accuracy",
                "eval/loss"):
        assert key in summary
    assert summary["stage"] == "sft" and summary["steps"] == 12
    curve = losses(run)
    assert len(curve) == 12 and all(map(torch.isfinite, torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve  # loss falls
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.hidden_size == 32


def test_two_workers_zero2_match_one_worker(tmp_path, ray_local):
    """Same global batch and seed: the loss curve must not depend on how it is sharded."""
    common = ("trainer.max_steps=6", "trainer.global_batch_size=16", "eval.exact_match=false")
    one = tiny_sft_config(tmp_path / "one", *common, "trainer.micro_batch_size=8",
                          "distributed.num_workers=1", "distributed.zero_stage=0")
    two = tiny_sft_config(tmp_path / "two", *common, "trainer.micro_batch_size=8",
                          "distributed.num_workers=2", "distributed.zero_stage=2")
    SFTTrainer(one, show_progress=False).fit()
    SFTTrainer(two, show_progress=False).fit()
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert len(a) == len(b) == 6
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) < 1e-4, f"step {step}: {x} vs {y}"
    assert a[-1] < a[0]


def test_zero3_lora_two_workers_trains_only_adapters(tmp_path, ray_local, tiny_model_dir):
    base = tiny_model_dir("llama")
    cfg = tiny_sft_config(tmp_path, f"model.name_or_path={base}", "model.lora.enabled=true",
                          "model.lora.r=8", "trainer.lr=1e-2", "trainer.max_steps=10",
                          "distributed.num_workers=2", "distributed.zero_stage=3",
                          "eval.exact_match=false")
    SFTTrainer(cfg, show_progress=False).fit()
    run = tmp_path / "run"
    curve = losses(run)
    assert curve[-1] < curve[0], curve
    final = run / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # The base weights inside the trained model are the original ones.
    original = AutoModelForCausalLM.from_pretrained(base)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    base_state = trained.get_base_model().state_dict()
    for name, value in original.state_dict().items():
        key = name.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(base_state.get(name, base_state.get(key)), value)

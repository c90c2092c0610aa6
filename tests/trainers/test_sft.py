"""SFT end to end through Ray workers and DeepSpeed: outputs, sharding parity, ZeRO-3 + LoRA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from ray import cloudpickle
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer, get_scheduler

from align.tracking import read_metrics
from align.trainers.sft import SFTTrainer
from tests.conftest import tiny_sft_config

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # probe functions for the workers
PROBE = {"input_ids": torch.tensor([ByT5Tokenizer()("Q: 23+58= 81").input_ids])}


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def probe_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Worker side: the live model's logits on PROBE."""
    return model(input_ids=batch["input_ids"], use_cache=False).logits.float()


class InspectedSFT(SFTTrainer):
    """Looks inside the workers after training, before they are shut down: the trained
    policy's logits on PROBE, its full weights, and (if asked) a merged-LoRA save."""

    merged_copy: Path | None = None

    def evaluate(self, final: bool) -> dict[str, float]:
        metrics = super().evaluate(final)
        if final:
            self.worker_logits = self.group.call("infer", probe_logits, [PROBE])[0][0]
            self.worker_state = self.group.call("full_state_dict")[0]
            if self.merged_copy is not None:
                self.group.call("save", str(self.merged_copy), merged=True)
        return metrics


def plain_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROBE["input_ids"]).logits.float()


def expected_lrs(peak: float, warmup: int, total: int) -> list[float]:
    """Per-step learning rates of a linear schedule with warmup (transformers' own)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=warmup,
                             num_training_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_run_outputs_and_learning(tmp_path, ray_local):
    # 1.5 epochs of 128 examples in batches of 16 = 12 steps, the first quarter warming up.
    cfg = tiny_sft_config(tmp_path, "task.num_train=128", "trainer.max_steps=0",
                          "trainer.epochs=1.5", "trainer.scheduler=linear",
                          "trainer.warmup_ratio=0.25", "trainer.save_every=5",
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
    logged = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    assert [m["lr"] for m in logged] == pytest.approx(expected_lrs(3e-3, 3, 12), rel=1e-6)
    assert [m["epoch"] for m in logged] == pytest.approx([s / 8 for s in range(12)])
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.hidden_size == 32


def test_two_workers_zero2_match_one_worker(tmp_path, ray_local):
    """Same global batch and seed: the loss curve must not depend on how it is sharded, nor on
    packing (one padding-free row per micro-batch) against padding, nor on micro-batches cut
    by a token budget."""
    common = ("trainer.max_steps=6", "trainer.global_batch_size=16", "eval.exact_match=false")
    one = tiny_sft_config(tmp_path / "one", *common, "trainer.micro_batch_size=8",
                          "distributed.num_workers=1", "distributed.zero_stage=0")
    two = tiny_sft_config(tmp_path / "two", *common, "trainer.micro_batch_size=8",
                          "distributed.num_workers=2", "distributed.zero_stage=2")
    padded = tiny_sft_config(tmp_path / "padded", *common, "trainer.micro_batch_size=8",
                             "data.packing=false")
    budget = tiny_sft_config(tmp_path / "budget", *common, "data.packing=false",
                             "trainer.max_tokens_per_micro_batch=48",
                             "distributed.num_workers=2", "distributed.zero_stage=2")
    SFTTrainer(one, show_progress=False).fit()
    trainer = InspectedSFT(two, show_progress=False)
    trainer.fit()
    SFTTrainer(padded, show_progress=False).fit()
    SFTTrainer(budget, show_progress=False).fit()
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    c, d = losses(tmp_path / "padded" / "run"), losses(tmp_path / "budget" / "run")
    assert len(a) == len(b) == len(c) == len(d) == 6
    for step, (x, y, z, w) in enumerate(zip(a, b, c, d), start=1):
        assert abs(x - y) < 1e-4, f"step {step}: {x} vs {y}"
        assert abs(x - z) < 1e-4, f"step {step}, padded: {x} vs {z}"
        assert abs(x - w) < 1e-4, f"step {step}, token budget: {x} vs {w}"
    assert a[-1] < a[0]
    # final/ (full weights gathered from ZeRO-2 ranks), reloaded with plain transformers, is
    # the trained policy.
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "run" / "final")
    torch.testing.assert_close(plain_logits(final), trainer.worker_logits, rtol=1e-5, atol=1e-5)


def test_zero3_lora_two_workers_trains_only_adapters(tmp_path, ray_local, tiny_model_dir):
    base = tiny_model_dir("llama")
    cfg = tiny_sft_config(tmp_path, f"model.name_or_path={base}", "model.lora.enabled=true",
                          "model.lora.r=8", "trainer.lr=1e-2", "trainer.max_steps=10",
                          "distributed.num_workers=2", "distributed.zero_stage=3",
                          "eval.exact_match=false")
    trainer = InspectedSFT(cfg, show_progress=False)
    trainer.merged_copy = tmp_path / "merged"
    trainer.fit()
    run = tmp_path / "run"
    curve = losses(run)
    assert curve[-1] < curve[0], curve
    final = run / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # Inside the workers, after training: every base weight is still the original one.
    original = AutoModelForCausalLM.from_pretrained(base)
    trained = trainer.worker_state
    for name, value in original.state_dict().items():
        key = f"base_model.model.{name}"
        key = key if key in trained else key.replace(".weight", ".base_layer.weight")
        assert torch.equal(trained[key], value), name
    # The adapter over the base, and the merged save from ZeRO-3 ranks reloaded with plain
    # transformers, are both the trained policy.
    expected = trainer.worker_logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    torch.testing.assert_close(plain_logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(plain_logits(merged), expected, rtol=1e-5, atol=1e-5)

"""Stages chained through LoRA runs: each stage starts from the previous stage's final/, which
for a LoRA run over a model folder is an adapter alone (an adapter over an adapter, by the
third stage), and align's loader and peft's own agree on what it holds."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from align.config import ModelConfig
from align.model_loading import load_model, load_tokenizer
from align.trainers.dpo import DPOTrainer
from align.trainers.ppo import PPOTrainer
from align.trainers.sft import SFTTrainer
from tests.conftest import full_only, tiny_dpo_config, tiny_ppo_config, tiny_sft_config

pytestmark = pytest.mark.slow
IDS = torch.tensor([[5, 40, 41, 42, 60, 61, 70]])
LORA = "model.lora.enabled=true"


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def aligns_model(folder) -> torch.nn.Module:
    cfg = ModelConfig(name_or_path=str(folder), dtype="float32")
    return load_model(cfg, load_tokenizer(cfg))


@full_only  # the adapter-over-adapter loading runs in `make test` (tests/test_model_loading.py)
def test_sft_lora_then_dpo_lora_then_grpo_lora_each_from_the_last_final(tmp_path, ray_local):
    SFTTrainer(tiny_sft_config(tmp_path / "sft", LORA, "trainer.max_steps=2",
                               "eval.max_samples=4"), show_progress=False).fit()
    sft = tmp_path / "sft" / "run" / "final"
    assert (sft / "config.json").is_file()  # the embedded base exists on no disk: merged
    DPOTrainer(tiny_dpo_config(tmp_path / "dpo", f"model.name_or_path={sft}", LORA,
                               "trainer.max_steps=2", "eval.max_samples=4"),
               show_progress=False).fit()
    dpo = tmp_path / "dpo" / "run" / "final"
    summary = PPOTrainer(tiny_ppo_config(tmp_path / "grpo", f"model.name_or_path={dpo}", LORA,
                                         "trainer.max_steps=1", "eval.max_samples=4"),
                         show_progress=False).fit()
    grpo = tmp_path / "grpo" / "run" / "final"
    assert summary["steps"] == 1
    for final, base in ((dpo, sft), (grpo, dpo)):
        assert not (final / "config.json").exists()
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(base)
    # DPO trained on SFT's model; GRPO's final/ is SFT + DPO's adapter + its own, as peft
    # stacks them by hand.
    assert not torch.allclose(logits(aligns_model(dpo)), logits(aligns_model(sft)))
    by_hand = PeftModel.from_pretrained(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), dpo)
        .merge_and_unload(), grpo)
    torch.testing.assert_close(logits(aligns_model(grpo)), logits(by_hand), atol=1e-5,
                               rtol=1e-5)

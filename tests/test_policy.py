"""Policy loading, LoRA on several architectures, and save -> plain reload round trips."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.errors import ModelError
from align.policy import Policy
from align.rollout import Sampling

ARCHS = ["llama", "qwen2", "gpt2", "opt"]
IDS = torch.tensor([[5, 40, 41, 42, 60, 61, 70]])


def frozen_policy(model_cfg: ModelConfig) -> Policy:
    return Policy(model_cfg, TrainerConfig(), DistributedConfig(), total_steps=1,
                  trainable=False)


def perturb_adapters(model: torch.nn.Module) -> None:
    """Fresh LoRA B matrices are zero (a no-op adapter); make them matter for the test."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapter_and_merged_round_trip(arch, tiny_model_dir, saved_tokenizer, tmp_path):
    base = tiny_model_dir(arch)
    cfg = ModelConfig(name_or_path=base, tokenizer=str(saved_tokenizer))
    cfg.lora.enabled = True
    policy = frozen_policy(cfg)
    n_lora = sum(1 for n, _ in policy.model.named_parameters() if "lora_" in n)
    assert n_lora > 0, f"all-linear found no layer in {arch}"
    perturb_adapters(policy.model)
    expected = logits(policy.model)

    policy.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                         tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)

    policy.save(tmp_path / "merged", merged=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)


def test_embedded_full_model_round_trip(tmp_path):
    policy = frozen_policy(ModelConfig())
    expected = logits(policy.model)
    policy.save(tmp_path / "final")
    assert list((tmp_path / "final").glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    torch.testing.assert_close(logits(model), expected)
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    text = "Q: 12+30="
    assert tok(text, add_special_tokens=False).input_ids == \
        policy.tokenizer(text, add_special_tokens=False).input_ids


def test_embedded_is_deterministic():
    a, b = frozen_policy(ModelConfig()), frozen_policy(ModelConfig())
    torch.testing.assert_close(logits(a.model), logits(b.model), rtol=0, atol=0)


def test_generate_returns_new_tokens_cut_at_eos():
    policy = frozen_policy(ModelConfig())
    out = policy.generate([[40, 41], [40, 41, 42, 43]], Sampling(max_new_tokens=5)).tokens
    assert len(out) == 2
    eos = policy.tokenizer.eos_token_id
    for row in out:
        assert 1 <= len(row) <= 5
        assert eos not in row[:-1]


def test_missing_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no-model"):
        frozen_policy(ModelConfig(name_or_path=str(tmp_path / "no-model")))


def test_lora_targets_matching_nothing(tiny_model_dir):
    cfg = ModelConfig(name_or_path=tiny_model_dir("llama"))
    cfg.lora.enabled = True
    cfg.lora.target_modules = ["no_such_layer"]
    with pytest.raises(ModelError, match="target_modules"):
        frozen_policy(cfg)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_disable_dropout_makes_train_mode_forward_equal_eval_mode(arch, dropout_model_dir):
    cfg = ModelConfig(name_or_path=dropout_model_dir(arch), disable_dropout=True)
    model = frozen_policy(cfg).model
    expected = logits(model.eval())
    torch.testing.assert_close(logits(model.train()), expected, rtol=0, atol=0)
    # the same folder with dropout left on: the train-mode forward is another function
    kept = frozen_policy(ModelConfig(name_or_path=cfg.name_or_path, disable_dropout=False)).model
    assert (logits(kept.train()) - expected).abs().max() > 0.1


def test_disable_dropout_defaults_per_stage_and_conflicts_with_lora_dropout():
    from align.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, load_config
    from align.errors import ConfigError

    assert [c().model.disable_dropout for c in (SFTConfig, RMConfig, DPOConfig, PPOConfig)] == [
        False, True, True, True]
    assert load_config(SFTConfig, None, ["model.disable_dropout=true"]).model.disable_dropout
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_config(DPOConfig, None, ["model.lora.enabled=true", "model.lora.dropout=0.05"])
    assert load_config(DPOConfig, None, ["model.lora.enabled=true", "model.lora.dropout=0.05",
                                         "model.disable_dropout=false"]).model.lora.dropout

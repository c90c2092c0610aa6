"""Tokenizer loading: `model.chat_template` overrides the tokenizer's template. Model loading:
a LoRA run's adapter-only final/ loads as its base with the adapter merged in, so it can start
the next stage, even as an adapter over an adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.data import tokenize_sft
from align.errors import ConfigError, ModelError
from align.model_loading import check_lora_targets, config_source, load_model, load_tokenizer
from align.policy import Policy
from align.rollout.local import load_for_generation
from align.rollout.vllm_engine import engine_model_config

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("as_file", [False, True])
def test_a_template_string_or_file_replaces_the_tokenizers(tmp_path, saved_tokenizer, as_file):
    value = CHATML
    if as_file:
        (tmp_path / "chatml.jinja").write_text(CHATML)
        value = str(tmp_path / "chatml.jinja")
    tok = load_tokenizer(ModelConfig(tokenizer=str(saved_tokenizer), chat_template=value))
    assert tok.chat_template == CHATML
    (example,), _ = tokenize_sft([{"messages": MESSAGES}], tok, max_length=128)
    text = tok.decode(example.input_ids)
    assert text.startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4")
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)  # what every run's final/ holds
    assert load_tokenizer(ModelConfig(tokenizer=str(saved))).chat_template == CHATML


@pytest.mark.parametrize("value, message", [
    ("no/such/template.jinja", "neither a file nor a Jinja template"),
    ("{% for m in messages %}{{ m['content'] }}", "invalid Jinja template"),
])
def test_a_bad_template_names_the_key(saved_tokenizer, value, message):
    with pytest.raises(ConfigError, match=f"model.chat_template: .*{message}"):
        load_tokenizer(ModelConfig(tokenizer=str(saved_tokenizer), chat_template=value))


IDS = torch.tensor([[5, 40, 41, 42, 60, 61, 70]])


def lora_policy(name_or_path: str) -> Policy:
    """A frozen policy over `name_or_path` with fresh LoRA adapters made non-trivial."""
    cfg = ModelConfig(name_or_path=name_or_path, dtype="float32")
    cfg.lora.enabled = True
    policy = Policy(cfg, TrainerConfig(), DistributedConfig(), total_steps=1, trainable=False)
    generator = torch.Generator().manual_seed(len(name_or_path))
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return policy


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_an_adapter_final_loads_as_a_model_even_over_another_adapter(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    first = lora_policy(base)
    first.save(tmp_path / "dpo")  # adapter only: its base is a model folder
    expected_first = logits(first.model)
    second = lora_policy(str(tmp_path / "dpo"))  # the next stage starts from that final/
    second.save(tmp_path / "grpo")
    expected_second = logits(second.model)
    assert not (tmp_path / "grpo" / "config.json").exists()
    settings = json.loads((tmp_path / "grpo" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(tmp_path / "dpo")
    assert config_source(str(tmp_path / "grpo")) == base

    for folder, expected in (("dpo", expected_first), ("grpo", expected_second)):
        cfg = ModelConfig(name_or_path=str(tmp_path / folder), dtype="float32")
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, tokenizer)
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
        cfg.lora.enabled = True
        check_lora_targets(cfg, tokenizer)
        # A critic or reward model may start from it too: the same backbone, a new score head.
        scorer = load_model(cfg, tokenizer, "sequence_classification")
        assert scorer.config.num_labels == 1
        backbone = model.model.state_dict()
        for key, value in scorer.model.state_dict().items():
            torch.testing.assert_close(value, backbone[key], msg=key)
    # `align eval` loads the same model, and reads EOS ids where the base model keeps them.
    model, source = load_for_generation(ModelConfig(name_or_path=str(tmp_path / "grpo"),
                                                    dtype="float32"), tokenizer)
    torch.testing.assert_close(logits(model), expected_second, atol=1e-5, rtol=1e-5)
    assert source.name_or_path == base
    # A vLLM engine starts from the base's architecture (the weights come from the policy).
    config_json, _ = engine_model_config(ModelConfig(name_or_path=str(tmp_path / "grpo")),
                                         tokenizer)
    assert json.loads(config_json)["model_type"] == "llama"
    # peft's own loaders, stacked by hand, agree.
    by_hand = PeftModel.from_pretrained(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "dpo")
        .merge_and_unload(), tmp_path / "grpo")
    torch.testing.assert_close(logits(by_hand), expected_second, atol=1e-5, rtol=1e-5)


def test_an_adapter_whose_base_is_missing_names_both(tmp_path, tiny_model_dir):
    lora_policy(tiny_model_dir("llama")).save(tmp_path / "final")
    settings = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "final" / "adapter_config.json").write_text(json.dumps(settings))
    cfg = ModelConfig(name_or_path=str(tmp_path / "final"), dtype="float32")
    with pytest.raises(ModelError, match=r"is an adapter over '.*gone'.*does not exist"):
        load_model(cfg, load_tokenizer(cfg))

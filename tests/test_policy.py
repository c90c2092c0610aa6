"""Policy loading, LoRA on several architectures, and save -> plain reload round trips."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.errors import ModelError
from align.policy import Policy
from align.rollout import Sampling
from align.saving import save_pretrained

ARCHS = ["llama", "qwen2", "gpt2", "opt"]
IDS = torch.tensor([[5, 40, 41, 42, 60, 61, 70]])
GREEDY = Sampling(max_new_tokens=6, greedy=True)


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
    cfg = ModelConfig(name_or_path=base, tokenizer=str(saved_tokenizer), dtype="float32")
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


def test_a_lora_reward_models_final_loads_as_the_reward_model_docs_say(
        tiny_model_dir, saved_tokenizer, tmp_path):
    """docs/reward-model.md: `align rm`'s final/ loads with plain
    `AutoModelForSequenceClassification.from_pretrained(final)`, LoRA included (merged); with
    `model.lora.save_merged: false` it is an adapter that transformers' and peft's loaders both
    load when told `num_labels=1`."""
    cfg = ModelConfig(name_or_path=tiny_model_dir("llama"), tokenizer=str(saved_tokenizer),
                      dtype="float32")
    cfg.lora.enabled = True
    policy = Policy(cfg, TrainerConfig(), DistributedConfig(), total_steps=1,
                    kind="sequence_classification", trainable=False)
    perturb_adapters(policy.model)
    expected = logits(policy.model)
    assert expected.shape == (1, 1)

    policy.save(tmp_path / "final")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)

    cfg.lora.save_merged = False
    policy.save(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    for loader in (AutoModelForSequenceClassification, AutoPeftModelForSequenceClassification):
        model = loader.from_pretrained(tmp_path / "adapter", num_labels=1).eval()
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_embedded_full_model_round_trip(tmp_path):
    policy = frozen_policy(ModelConfig(dtype="float32"))
    expected = logits(policy.model)
    policy.save(tmp_path / "final")
    assert list((tmp_path / "final").glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    torch.testing.assert_close(logits(model), expected)
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    text = "Q: 12+30="
    assert tok(text, add_special_tokens=False).input_ids == \
        policy.tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("merged", [False, True], ids=["full", "merged-lora"])
def test_save_refuses_weights_that_do_not_fit(tmp_path, tiny_model_dir, merged):
    """A state dict missing a tensor (or holding a foreign one) must not become a model."""
    cfg = ModelConfig(name_or_path=tiny_model_dir("llama"), dtype="float32")
    cfg.lora.enabled = merged
    policy = frozen_policy(cfg)
    state = policy.full_state_dict()
    dropped = next(k for k in state if "layers.1.mlp" in k)
    missing = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(ModelError, match=f"missing.*{dropped}"):
        save_pretrained(policy.model, missing, policy.tokenizer, tmp_path / "a", merged)
    with pytest.raises(ModelError, match="unexpected.*extra.weight"):
        save_pretrained(policy.model, {**state, "extra.weight": torch.zeros(1)},
                        policy.tokenizer, tmp_path / "b", merged)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    save_pretrained(policy.model, state, policy.tokenizer, tmp_path / "c", merged)
    assert list((tmp_path / "c").glob("*.safetensors"))


def test_embedded_is_deterministic():
    a, b = frozen_policy(ModelConfig(dtype="float32")), frozen_policy(ModelConfig(dtype="float32"))
    torch.testing.assert_close(logits(a.model), logits(b.model), rtol=0, atol=0)


@torch.no_grad()
def greedy_by_hand(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
                   eos: int) -> list[int]:
    """Argmax of the next-token logits, one unpadded forward per token, stopping after EOS."""
    ids, new = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
        if token == eos:
            break
    return new


def test_generate_is_greedy_decoding_unchanged_by_padding_and_batching():
    policy = frozen_policy(ModelConfig(dtype="float32"))
    tok = policy.tokenizer
    prompts = [tok(text, add_special_tokens=False).input_ids
               for text in ("Q: 3+4=", "Q: 23+58=", "Q: 99+99=", "Hi")]
    eos = tok.eos_token_id
    expected = [greedy_by_hand(policy.model, p, 6, eos) for p in prompts]
    batched = policy.generate(prompts, GREEDY).tokens  # left-padded to the longest prompt
    assert batched == expected
    assert [policy.generate([p], GREEDY).tokens[0] for p in prompts] == expected
    assert policy.generate(prompts[::-1], GREEDY).tokens == expected[::-1]
    for row in batched:
        assert 1 <= len(row) <= 6 and eos not in row[:-1]


def test_generate_returns_new_tokens_cut_after_the_first_eos(monkeypatch):
    policy = frozen_policy(ModelConfig(dtype="float32"))
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    new = [[5, eos, 7, eos], [6, 6, 6, 6]]

    def fake_generate(input_ids, **kwargs):  # the prompts (left-padded) + 4 new tokens each
        assert input_ids.tolist() == [[40, 41, 42], [pad, pad, 40]]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)

    from align.rollout import hf_sampling

    # `generate` doing the prefill too, as for a model whose cache align does not prefill.
    monkeypatch.setattr(hf_sampling, "supports_growing_cache", lambda config: False)
    monkeypatch.setattr(hf_sampling, "prefill_prompts", lambda *args: None)
    monkeypatch.setattr(policy.model, "generate", fake_generate)
    out = policy.generate([[40, 41, 42], [40]], Sampling(max_new_tokens=4, greedy=True))
    assert out.tokens == [[5, eos], [6, 6, 6, 6]]


def placed_by_deepspeed(model: torch.nn.Module, config: dict, **_: object):
    """`deepspeed.initialize` as it places a model on a GPU host under ZeRO 0-2, recorded: the
    parameters cast to bf16 (buffers kept fp32) and the module on the rank's device, here
    `meta` standing for `cuda:0`."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.to("meta")
    return SimpleNamespace(module=model), None, None, None


@pytest.mark.parametrize("zero", [0, 2])
def test_the_reference_goes_where_deepspeed_put_the_trained_model(monkeypatch, tiny_model_dir,
                                                                  saved_tokenizer, zero):
    """Without LoRA the reference is a second copy; it must live on the trained model's device,
    in its parameters' dtype, or its forward runs on the CPU (or fails on device mismatch)."""
    monkeypatch.setattr("align.policy.deepspeed.initialize", placed_by_deepspeed)
    cfg = ModelConfig(name_or_path=tiny_model_dir("llama"), tokenizer=str(saved_tokenizer),
                      dtype="float32")
    policy = Policy(cfg, TrainerConfig(), DistributedConfig(zero_stage=zero), total_steps=1,
                    reference=True)
    assert policy.device == torch.device("meta")
    with policy.reference_view() as reference:
        assert reference is not policy.model
        params = dict(reference.named_parameters())
        assert {(p.device.type, p.dtype) for p in params.values()} == {("meta", torch.bfloat16)}
        assert not any(p.requires_grad for p in params.values())
        buffers = dict(reference.named_buffers())
        assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
        assert {b.device.type for b in buffers.values()} == {"meta"}


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

"""Shared-prefix packing (a prompt laid out once, its completions after it) gives every sequence
what its own forward gives: logits, DPO log-probs, reward scores, rollout log-probs, entropies
and critic values; the start-up check finds where it holds, and the config decides its use."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    ByT5Tokenizer,
    LlamaForCausalLM,
)

from align.config import DataConfig, TaskConfig
from align.data import collate_preference, collate_preference_packed, tokenize_preference
from align.data.layout import LAYOUT_KEY, SharedPrefixLayout
from align.data.prefix_sharing import SharePrefix, pack_shared, share_padded
from align.errors import ConfigError
from align.losses import IGNORE_INDEX
from align.packed_forward import SHARED_CHECK, check_packing, model_inputs, resolve_packing
from align.tasks import arithmetic
from align.trainers.dpo import completion_logps
from align.trainers.ppo_objectives import _logprobs_and_entropy, token_values
from align.trainers.rollout import pad_sequences
from reward_models.reward_model import score_batch
from tests.conftest import tiny_config

ARCHS = ["llama", "qwen2", "gpt2", "opt"]
ALWAYS = SharePrefix(hidden_size=32, always=True)
PROMPTS = [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [9, 10], [9, 10], [11, 12, 13]]
RESPONSES = [[20, 21, 1], [22], [20, 23, 24, 1], [25, 1], [26, 27, 28, 29, 1], [30, 1]]


def causal(path: str, impl: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    def make(arch: str, impl: str = "sdpa"):
        torch.manual_seed(0)
        config = tiny_config(arch, len(ByT5Tokenizer()))
        config.num_labels = 1
        path = tmp_path_factory.mktemp(f"cls-{arch}")
        AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation=impl).eval()

    return make


def pairs(n: int = 6):
    return tokenize_preference(arithmetic.preference_rows(TaskConfig(), n), ByT5Tokenizer(),
                               max_length=24)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_logits_equal_separate_forwards(tiny_model_dir, arch, impl):
    """Every token of every sequence gets its own forward's logits, prefix tokens included."""
    model = causal(tiny_model_dir(arch), impl)
    sequences = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    batch = pack_shared(sequences, [[0, 1, 2], [3, 4], [5]], row_length=14, pad_id=0)
    assert batch["input_ids"].shape[0] > 1 and (batch[LAYOUT_KEY].unit_index == -1).any()
    assert batch["input_ids"].numel() < sum(map(len, sequences)) + 4  # prompts laid out once
    logits = model(**model_inputs(model, batch), use_cache=False).logits.flatten(0, 1)
    for i, sequence in enumerate(sequences):
        alone = model(input_ids=torch.tensor([sequence]), use_cache=False).logits[0]
        where = batch[LAYOUT_KEY].unpack_index[i, :len(sequence)]
        torch.testing.assert_close(logits[where], alone, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_shared_dpo_logps_and_reward_scores_equal_padded(tiny_model_dir, classifier, arch):
    examples = pairs()
    shared = collate_preference_packed(examples, None, 0, share=ALWAYS)
    assert isinstance(shared[LAYOUT_KEY], SharedPrefixLayout)
    padded = collate_preference(examples, 0)
    policy = causal(tiny_model_dir(arch))
    for got, want in zip(completion_logps(policy, shared), completion_logps(policy, padded)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    rm = classifier(arch)
    torch.testing.assert_close(score_batch(rm, shared), score_batch(rm, padded), atol=1e-5,
                               rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_rollout_logprobs_entropy_and_values_equal_padded(tiny_model_dir, classifier,
                                                                 arch, chunk):
    padded = pad_sequences(PROMPTS, RESPONSES, pad_id=0)
    shared = share_padded(padded, None, 0, ALWAYS, IGNORE_INDEX)
    assert isinstance(shared[LAYOUT_KEY], SharedPrefixLayout)
    assert shared[LAYOUT_KEY].unit_index.max() == 2  # three prompts, three units
    policy = causal(tiny_model_dir(arch))
    logp, entropy = _logprobs_and_entropy(policy, shared, 0.7, "value", chunk)
    want_logp, want_entropy = _logprobs_and_entropy(policy, padded, 0.7, "value", 0)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=0)
    assert (logp != 0).sum() == sum(map(len, RESPONSES))
    critic = classifier(arch)
    mask = padded["attention_mask"][:, :-1]
    torch.testing.assert_close(token_values(critic, shared) * mask,
                               token_values(critic, padded) * mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [0, 3])
def test_shared_gradients_equal_padded(tiny_model_dir, chunk):
    """The prefix's gradient sums what each sample sends it, as separate forwards do."""
    grads = []
    for share in (ALWAYS, None):
        model = causal(tiny_model_dir("llama"))
        padded = pad_sequences(PROMPTS, RESPONSES, pad_id=0)
        batch = share_padded(padded, None, 0, share, IGNORE_INDEX) or padded
        logp, _ = _logprobs_and_entropy(model, batch, 1.0, "none", chunk if share else 0)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_check_verdict_and_config(tiny_model_dir):
    verdict = check_packing(causal(tiny_model_dir("llama")), "causal_lm")
    assert verdict["shared_prefix"] and verdict["hidden_size"] == 32
    assert verdict["differences"][SHARED_CHECK] <= verdict["tolerance"]
    assert resolve_packing(DataConfig(), verdict).share_prefix == SharePrefix(32, always=False)
    assert resolve_packing(DataConfig(shared_prefix=True), verdict).share_prefix == ALWAYS
    assert resolve_packing(DataConfig(shared_prefix=False), verdict).share_prefix is None
    sdpa_only = {**verdict, "shared_prefix": False, "attn_implementation": "flash_attention_2",
                 "differences": {"position_ids": 0.0}}
    assert resolve_packing(DataConfig(), sdpa_only).share_prefix is None
    with pytest.raises(ConfigError, match=r"data.shared_prefix=true: .*needs sdpa or eager"):
        resolve_packing(DataConfig(shared_prefix=True), sdpa_only)


class MaskDroppingLlama(LlamaForCausalLM):
    """Keeps position ids but drops any 4D mask: packing holds, sharing a prefix would leak."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_check_finds_a_model_that_would_leak_across_branches(tiny_model_dir):
    model = MaskDroppingLlama.from_pretrained(tiny_model_dir("llama"),
                                              attn_implementation="sdpa").eval()
    verdict = check_packing(model, "causal_lm")
    assert verdict["attention"] == "position_ids"  # plain packing is still exact
    assert not verdict["shared_prefix"]
    assert verdict["differences"][SHARED_CHECK] > verdict["tolerance"]
    assert resolve_packing(DataConfig(), verdict).share_prefix is None
    with pytest.raises(ConfigError, match=r"data.shared_prefix=true: .*differs from separate"):
        resolve_packing(DataConfig(shared_prefix=True), verdict)

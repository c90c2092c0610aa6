"""Log-probs through the LM head in chunks (`align.chunked_logprobs`) equal the full logits'
on Llama, Qwen2 and GPT-2, in every layout (padded, packed, shared-prefix), at a temperature
other than 1, in values and gradients; they never hold the (tokens, V) logits; a model whose
logits are not its head's falls back to the full logits and says so."""

from __future__ import annotations

import copy
import logging
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from align.chunked_logprobs import logprob_source
from align.config import SFTConfig, TaskConfig, load_config
from align.data import (
    collate_packed,
    collate_padded,
    collate_preference,
    collate_preference_packed,
    tokenize_preference,
    tokenize_sft,
)
from align.data.packing import pack_padded
from align.data.prefix_sharing import SharePrefix, share_padded
from align.errors import ConfigError
from align.losses import IGNORE_INDEX
from align.tasks import arithmetic
from align.trainers.dpo import completion_logps
from align.trainers.ppo_objectives import _logprobs_and_entropy
from align.trainers.rollout import pad_sequences
from align.trainers.sft import sft_objective
from tests.conftest import tiny_config

ARCHS = ["llama", "qwen2", "gpt2"]
VOCAB = 384
CHUNK = 4  # tokens per chunk: every batch here takes several
TEMPERATURE = 0.7
ALWAYS = SharePrefix(hidden_size=32, always=True)
PROMPTS = [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [9, 10], [9, 10], [11, 12, 13]]
RESPONSES = [[20, 21, 1], [22], [20, 23, 24, 1], [25, 1], [26, 27, 28, 29, 1], [30, 1]]
PAIR_ROWS = [{"prompt": "Q: 12+7=", "chosen": " 19", "rejected": " 18"},
             {"prompt": "Q: 3+4=", "chosen": " 7", "rejected": " 17"},
             {"prompt": "Q: 50+50=", "chosen": " 100", "rejected": " 10"}]
SFT_ROWS = [{"prompt": "Q: 12+7=", "completion": " 19"}, {"text": "hello world, packed"},
            {"prompt": "Q: 3+4=", "completion": " 7"}]


@pytest.fixture(scope="module")
def models():
    """Factory: a tiny causal LM of `arch` with weights large enough for peaked logits."""
    cache: dict[str, torch.nn.Module] = {}

    def make(arch: str) -> torch.nn.Module:
        if arch not in cache:
            torch.manual_seed(0)
            config = tiny_config(arch, VOCAB)
            config.initializer_range = 0.2
            cache[arch] = AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa").eval()
        return cache[arch]

    return make


def rollout_batches() -> dict[str, dict]:
    padded = pad_sequences(PROMPTS, RESPONSES, pad_id=0)
    return {"padded": padded,
            "packed": pack_padded(padded, row_length=10, pad_id=0, attention="position_ids"),
            "shared": share_padded(padded, None, 0, ALWAYS, IGNORE_INDEX)}


def today_logprobs_and_entropy(model, padded: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-logits arithmetic as it was: fp32 logits / temperature, log-softmax."""
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                   use_cache=False).logits[:, :-1].float() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    labels = padded["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    return picked, -(logp.exp() * logp).sum(-1) * mask


def gradients(model, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) and sum(float(g.abs().sum()) for g in want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_logprobs_and_entropy_equal_todays(models, arch, layout):
    """PPO's forward (policy with entropy gradient; old and reference without): values and
    gradients of the chunked path equal the full logits', whatever the layout."""
    model = models(arch)
    padded = rollout_batches()["padded"]
    weights = torch.randn(padded["labels"][:, 1:].shape, generator=torch.Generator().manual_seed(0))
    want_logp, want_ent = today_logprobs_and_entropy(model, padded)
    want_grads = gradients(model, (want_logp * weights).sum() + want_ent.sum())
    batch = rollout_batches()[layout]
    logp, ent = _logprobs_and_entropy(model, batch, TEMPERATURE, "grad", CHUNK)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)
    assert (logp != 0).sum() == sum(map(len, RESPONSES))
    assert_same(gradients(model, (logp * weights).sum() + ent.sum()), want_grads)
    with torch.no_grad():
        logp, ent = _logprobs_and_entropy(model, batch, TEMPERATURE, "none", CHUNK)
    assert ent is None
    torch.testing.assert_close(logp, want_logp.detach(), atol=1e-5, rtol=0)


def test_logged_entropy_carries_no_gradient(models):
    logp, ent = _logprobs_and_entropy(models("llama"), rollout_batches()["padded"],
                                      TEMPERATURE, "value", CHUNK)
    assert logp.requires_grad and not ent.requires_grad and ent.abs().sum() > 0


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("arch", ARCHS)
def test_preference_logps_equal_full_logits(models, arch, layout):
    """DPO and its family: summed completion log-probs and their gradients."""
    model = models(arch)
    examples = tokenize_preference(PAIR_ROWS + arithmetic.preference_rows(TaskConfig(), 3),
                                   ByT5Tokenizer(), max_length=24)
    batch = {"padded": lambda: collate_preference(examples, 0),
             "packed": lambda: collate_preference_packed(examples, None, 0),
             "shared": lambda: collate_preference_packed(examples, None, 0, share=ALWAYS)}[layout]()
    weights = torch.randn(2 * len(examples), generator=torch.Generator().manual_seed(1))
    want, want_len = completion_logps(model, collate_preference(examples, 0), 0)
    want_grads = gradients(model, (want * weights).sum())
    got, got_len = completion_logps(model, batch, CHUNK)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got_len.tolist() == want_len.tolist()
    assert_same(gradients(model, (got * weights).sum()), want_grads)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_equals_cross_entropy(models, arch, packed):
    model = models(arch)
    examples = tokenize_sft(SFT_ROWS, ByT5Tokenizer(), max_length=64)[0]
    padded = collate_padded(examples, 0)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                   use_cache=False).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), padded["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX, reduction="sum") / 10.0
    want_grads = gradients(model, want)
    batch = collate_packed(examples, None, 0) if packed else padded
    loss, metrics = sft_objective(model, batch, num_tokens=10.0, logprob_chunk_size=CHUNK)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-6)
    assert metrics["tokens"] == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert_same(gradients(model, loss), want_grads)


def test_lora_adapter_and_its_reference_view_equal_full_logits(models):
    """A peft model (the policy with LoRA) and the same model with its adapter off (its
    reference): the head is found through the wrapper, the adapter's gradient is the same."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(models("qwen2")),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    padded, shared = rollout_batches()["padded"], rollout_batches()["shared"]
    with torch.no_grad():
        assert logprob_source(model, shared, CHUNK).hidden is not None  # not the fallback
    want, _ = _logprobs_and_entropy(model, padded, TEMPERATURE, "none", 0)
    want_grads = gradients(model, want.sum())
    got, _ = _logprobs_and_entropy(model, shared, TEMPERATURE, "none", CHUNK)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_same(gradients(model, got.sum()), want_grads)
    with model.disable_adapter(), torch.no_grad():
        got, _ = _logprobs_and_entropy(model, shared, TEMPERATURE, "none", CHUNK)
        plain, _ = today_logprobs_and_entropy(model.get_base_model(), padded)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    assert (got - want).abs().max() > 1e-3  # the adapter was off: other log-probs


# ----------------------------------------------------------------------------- memory


class LiveLogits(TorchDispatchMode):
    """Peak bytes of (.., V)-shaped tensors alive at once, and the largest one, over every
    operation run inside it (the backward's included); the head's (H, V) weight and its
    gradient are not logits."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.weight = vocab, (hidden, vocab)
        self.live, self.peak, self.largest = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[-1] == self.vocab
                    and tuple(t.shape) != self.weight):
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = t.untyped_storage().nbytes()
                    weakref.finalize(t.untyped_storage(), self.live.pop, key, None)
                self.largest = max(self.largest, t.numel())
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def logits_memory(model, batch: dict, chunk: int, entropy: str = "grad") -> LiveLogits:
    with LiveLogits(VOCAB, model.config.hidden_size) as probe:
        logp, ent = _logprobs_and_entropy(model, batch, TEMPERATURE, entropy, chunk)
        (logp.sum() + (ent.sum() if entropy == "grad" else 0)).backward()
    model.zero_grad()
    return probe


def test_chunked_path_never_holds_the_logits(models):
    """The full path makes (rows, W, V) logits and keeps fp32 copies for the backward; the
    chunked path's largest logits are (chunk, V), and what is alive at once stays a few
    chunks' worth, in the backward too (the head is recomputed per chunk)."""
    model = models("llama")
    prompts = [list(range(5, 5 + 6 + i % 3)) for i in range(8)]
    responses = [list(range(40, 40 + 12 + i % 5)) for i in range(8)]
    batch = pad_sequences(prompts, responses, pad_id=0)
    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    full = logits_memory(model, batch, 0)
    chunked = logits_memory(model, batch, CHUNK)
    assert full.largest >= batch["input_ids"].numel() * VOCAB
    # The model's own head runs at one position per row (logits_to_keep=1).
    assert chunked.largest <= max(CHUNK, len(prompts)) * VOCAB
    assert full.peak >= 3 * tokens * VOCAB * 4  # logits, their log-softmax, its exp...
    assert chunked.peak <= 16 * CHUNK * VOCAB * 4 < full.peak / 8


@pytest.mark.parametrize("entropy, copies", [("none", 1), ("value", 2)])
def test_a_linear_head_holds_one_copy_of_a_chunks_logits(models, entropy, copies):
    """Without the entropy's gradient a plain linear head takes the fused path: one fp32
    (chunk, V) tensor alive at a time in the forward and the backward, two while the logged
    entropy is computed."""
    model = models("llama")
    batch = pad_sequences([[5, 6, 7]] * 4, [list(range(40, 56))] * 4, pad_id=0)
    chunk = 16  # larger than the model's own head output at one position per row
    probe = logits_memory(model, batch, chunk, entropy)
    assert probe.largest == chunk * VOCAB
    assert probe.peak == copies * chunk * VOCAB * 4


# ----------------------------------------------------------------------------- fallback


def test_logits_that_are_not_the_heads_fall_back_to_full_logits(tiny_model_dir, caplog):
    """A model that rescales its logits after the head (as soft-capping models do) is found
    by the check on its first forward, logged, and scored from its full logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).eval()

    def rescale(_module, _args, out):
        out.logits = 2.0 * out.logits
        return out

    model.register_forward_hook(rescale)
    batch = rollout_batches()["padded"]
    with caplog.at_level(logging.WARNING, logger="align.chunked_logprobs"):
        source = logprob_source(model, batch, CHUNK)
    assert source.logits is not None and source.hidden is None
    assert "full logits" in caplog.text and "Qwen2ForCausalLM" in caplog.text
    with torch.no_grad():
        got, _ = _logprobs_and_entropy(model, batch, TEMPERATURE, "none", CHUNK)
        want, _ = _logprobs_and_entropy(model, batch, TEMPERATURE, "none", 0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_negative_chunk_size_names_the_key():
    with pytest.raises(ConfigError, match="trainer.logprob_chunk_size"):
        load_config(SFTConfig, None, ["trainer.logprob_chunk_size=-1"])

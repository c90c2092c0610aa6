"""Packed forwards equal separate forwards on every architecture that keeps packing on, and a
model on which packing would leak is padded with a warning, or stops the run when asked for."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    ByT5Tokenizer,
)

from align.checkpoint import RUN_MARKER, prepare_output_dir
from align.config import DataConfig, TaskConfig
from align.data import (
    collate_packed,
    collate_padded,
    collate_preference,
    collate_preference_packed,
    tokenize_preference,
    tokenize_sft,
)
from align.data.layout import LAYOUT_KEY
from align.data.packing import ONE_ROW, pack_padded
from align.errors import ConfigError
from align.packed_forward import check_packing, model_inputs, resolve_packing
from align.tasks import arithmetic
from align.trainers.ppo_objectives import token_logprobs, token_values
from align.trainers.rollout import pad_sequences
from align.trainers.sft import SFTTrainer
from reward_models.reward_model import score_batch
from tests.conftest import tiny_config, tiny_sft_config

ARCHS = ["llama", "qwen2", "gpt2", "opt"]
# OPT builds its mask without the position ids: it needs the block mask we pass.
EXPECTED = {"llama": "position_ids", "qwen2": "position_ids", "gpt2": "position_ids",
            "opt": "block_mask"}
ROWS = [{"prompt": "Q: 12+7=", "completion": " 19"}, {"text": "hello world, packed"},
        {"prompt": "Q: 3+4=", "completion": " 7"}, {"text": "a longer text that fills a row"},
        {"prompt": "Q: 50+50=", "completion": " 100"}]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """Factory: a tiny random one-label sequence classifier of `arch`, saved locally."""
    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            tok = ByT5Tokenizer()
            config = tiny_config(arch, len(tok))
            config.num_labels = 1
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(config)
            path = tmp_path_factory.mktemp(f"tiny-cls-{arch}")
            model.save_pretrained(path)
            tok.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return make


def causal(path: str, impl: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()


def sft_examples():
    return tokenize_sft(ROWS, ByT5Tokenizer(), max_length=64)[0]


# --------------------------------------------------------------------------- the check


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_check_finds_the_strategy_that_is_exact(tiny_model_dir, classifier_dir, arch, impl):
    verdict = check_packing(causal(tiny_model_dir(arch), impl), "causal_lm")
    assert verdict["attention"] == EXPECTED[arch], verdict
    assert verdict["attn_implementation"] == impl
    assert verdict["architecture"].endswith(("ForCausalLM", "LMHeadModel"))
    if arch == "opt":  # position ids alone leak on OPT, and the check sees it
        assert verdict["differences"]["position_ids"] > 1e-2
    model = AutoModelForSequenceClassification.from_pretrained(
        classifier_dir(arch), attn_implementation=impl).eval()
    assert check_packing(model, "sequence_classification")["attention"] == EXPECTED[arch]


# --------------------------------------------------------------------------- exactness


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_equal_separate_forwards(tiny_model_dir, arch):
    """Bounded rows (several sequences per row, padding at the ends) give each sequence the
    logits of its own forward, to 1e-5."""
    model = causal(tiny_model_dir(arch))
    examples = sft_examples()
    batch = collate_packed(examples, row_length=40, pad_id=0, attention=EXPECTED[arch])
    index = batch[LAYOUT_KEY].sequence_index
    assert batch["input_ids"].shape[0] > 1 and (index == -1).any()
    logits = model(**model_inputs(model, batch), use_cache=False).logits.flatten(0, 1)
    flat_index = index.flatten()
    for i, example in enumerate(examples):
        alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(logits[flat_index == i], alone, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_reward_scores_equal_separate(classifier_dir, arch):
    """The reward model reads each packed sequence where Hugging Face's head reads it alone."""
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir(arch)).eval()
    pairs = tokenize_preference(arithmetic.preference_rows(TaskConfig(), 6), ByT5Tokenizer(),
                                max_length=24)
    packed = score_batch(model, collate_preference_packed(pairs, 30, 0, EXPECTED[arch]))
    padded = score_batch(model, collate_preference(pairs, 0))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    first = torch.tensor([pairs[0].prompt_ids + pairs[0].chosen_ids])
    torch.testing.assert_close(packed[0], model(input_ids=first).logits[0, 0], atol=1e-5,
                               rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_packed_rollout_logprobs_and_values_equal_padded(tiny_model_dir, classifier_dir, arch):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21, 1], [22], [23, 24, 25, 26, 1]]
    padded = pad_sequences(prompts, responses, pad_id=0)
    packed = pack_padded(padded, row_length=10, pad_id=0, attention=EXPECTED[arch])
    assert packed["input_ids"].shape[0] > 1
    policy = causal(tiny_model_dir(arch))
    expected = token_logprobs(policy, padded, temperature=0.7)
    torch.testing.assert_close(token_logprobs(policy, packed, temperature=0.7), expected,
                               atol=1e-5, rtol=0)
    assert (expected != 0).sum() == sum(map(len, responses))
    critic = AutoModelForSequenceClassification.from_pretrained(classifier_dir(arch)).eval()
    mask = padded["attention_mask"][:, :-1]
    torch.testing.assert_close(token_values(critic, packed) * mask,
                               token_values(critic, padded) * mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("row_length", [40, ONE_ROW])
def test_padded_sft_loss_equals_packed(tiny_model_dir, row_length):
    """Same loss and target count: no label crosses from one packed example into the next."""
    from align.trainers.sft import sft_objective

    model = causal(tiny_model_dir("gpt2"))
    examples = sft_examples()
    packed = sft_objective(model, collate_packed(examples, row_length, 0), num_tokens=10.0)
    padded = sft_objective(model, collate_padded(examples, 0), num_tokens=10.0)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-6)
    assert packed[1]["tokens"] == padded[1]["tokens"]


# --------------------------------------------------------------------------- leaks


def causal_only(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention kernel that takes no sequence boundaries: causal over the whole row."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("causal_only", causal_only)


def test_leaking_attention_is_found(tiny_model_dir):
    verdict = check_packing(causal(tiny_model_dir("llama"), "causal_only"), "causal_lm")
    assert verdict["attention"] is None
    assert verdict["differences"]["position_ids"] > verdict["tolerance"]
    assert "block_mask" not in verdict["differences"]  # it takes no mask either


def test_resolve_packing_warns_or_stops(tiny_model_dir, caplog):
    verdict = check_packing(causal(tiny_model_dir("llama"), "causal_only"), "causal_lm")
    with caplog.at_level(logging.WARNING, logger="align.packed_forward"):
        assert resolve_packing(DataConfig(), verdict) is None  # default: pad, with a warning
    assert "LlamaForCausalLM" in caplog.text and "packing is off" in caplog.text
    with pytest.raises(ConfigError, match=r"data.packing=true: .*LlamaForCausalLM.*causal_only"):
        resolve_packing(DataConfig(packing=True), verdict)
    assert resolve_packing(DataConfig(packing=False), verdict) is None
    exact = check_packing(causal(tiny_model_dir("llama")), "causal_lm")
    chosen = resolve_packing(DataConfig(), exact)
    assert (chosen.attention, chosen.row_length) == ("position_ids", None)
    assert resolve_packing(DataConfig(packing_length=50), exact).row_length == 50
    flash = {**exact, "attn_implementation": "flash_attention_2"}
    assert resolve_packing(DataConfig(), flash).row_length == ONE_ROW


# --------------------------------------------------------------------------- end to end

LEAKY_MODEL = '''
from transformers import LlamaForCausalLM


class LeakyLlamaForCausalLM(LlamaForCausalLM):
    """Drops position ids and custom masks: its attention never sees sequence boundaries."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
'''


@pytest.fixture(scope="module")
def leaky_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny Llama as a remote-code model whose forward ignores sequence boundaries."""
    path = tmp_path_factory.mktemp("tiny-leaky")
    causal(tiny_model_dir("llama")).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    (path / "modeling_leaky.py").write_text(LEAKY_MODEL)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LeakyLlamaForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_leaky.LeakyLlamaForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
def test_leaky_model_pads_by_default_and_stops_when_packing_is_required(
        tmp_path, ray_local, leaky_model_dir, caplog):
    common = [f"model.name_or_path={leaky_model_dir}", "model.trust_remote_code=true",
              "trainer.max_steps=2", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=8", "eval.exact_match=false"]
    trainer = SFTTrainer(tiny_sft_config(tmp_path / "auto", *common), show_progress=False)
    with caplog.at_level(logging.WARNING, logger="align.packed_forward"):
        summary = trainer.fit()
    assert trainer.packing is None and summary["steps"] == 2  # trained, padded
    assert "LeakyLlamaForCausalLM" in caplog.text and "packing is off" in caplog.text
    explicit = tiny_sft_config(tmp_path / "explicit", *common, "data.packing=true")
    with pytest.raises(ConfigError, match=r"data.packing=true: .*LeakyLlamaForCausalLM"):
        SFTTrainer(explicit, show_progress=False).fit()  # the CLI prints it and exits 2
    # Nothing but the run marker was written, so the corrected command reruns without
    # overwrite=true.
    run = tmp_path / "explicit" / "run"
    assert [p.name for p in run.iterdir()] == [RUN_MARKER]
    prepare_output_dir(run, overwrite=False, resuming=False)

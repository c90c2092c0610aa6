"""Shared fixtures: one Ray instance per test run, tiny models saved locally, small configs.

Tests compare numbers exactly, so a test session runs on the CPU in fp32 even on a GPU host:
the GPU is hidden from this process and from Ray's workers. `ALIGN_TEST_GPU=1 pytest -m gpu`
runs the GPU tests with it visible; without a GPU they are skipped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prepared data and datasets' own Arrow copies go to a folder of this test run, not ~/.cache,
# removed when the process that made it exits.
_CACHE = tempfile.mkdtemp(prefix="align-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("ALIGN_DATA_CACHE", os.path.join(_CACHE, "align"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("ALIGN_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch, DeepSpeed or Ray look for a GPU

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    ByT5Tokenizer,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

from align.config import RMConfig, SFTConfig, load_config  # noqa: E402
from align.distributed import ensure_ray  # noqa: E402

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}
# Every tiny config: fp32 on CPU workers, whatever the host has (`dtype: auto` is bf16 on GPU).
CPU_FP32 = ("model.dtype=float32", "distributed.gpus_per_worker=0")


# Tests CI runs (`.ci/run` sets ALIGN_TEST_FULL=1) and `make test` leaves out, to stay within
# 15 minutes on 2 cores: each repeats a path other tests of the default suite cover, at a
# minute or more of its own.
full_only = pytest.mark.skipif(os.environ.get("ALIGN_TEST_FULL") != "1",
                               reason="ALIGN_TEST_FULL=1 runs it")

# Modules of several whole runs each (a minute or more per test), started first.
LONGEST = ("test_resume.py", "test_quickstart.py", "test_async_engine.py")


def pytest_collection_modifyitems(config, items) -> None:
    """The longest tests run first, then the other end-to-end (`slow`) ones, so that with
    `-n 2` (`make test`) the two workers share them instead of one finishing them alone at the
    end. Tests marked `gpu` are skipped where torch sees no CUDA device (or it is hidden)."""
    items.sort(key=lambda item: (item.path.name not in LONGEST, "slow" not in item.keywords))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU: ALIGN_TEST_GPU=1 pytest -m gpu on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def ray_local():
    """A local Ray (started once, reused; restarted if a test shut it down)."""
    if not ray.is_initialized():
        ensure_ray(None)
    yield


def tiny_config(arch: str, vocab: int):
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=128, pad_token_id=0, eos_token_id=1)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=128, pad_token_id=0, eos_token_id=1)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                          pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def saved_tokenizer(tmp_path_factory):
    """The byte-level tokenizer saved to a folder, for models whose own folder can't hold it."""
    path = tmp_path_factory.mktemp("tokenizer")
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a tiny random model of `arch` saved locally with a byte-level tokenizer."""
    cache: dict[str, str] = {}

    def make(arch: str = "llama") -> str:
        if arch not in cache:
            tok = ByT5Tokenizer()
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            tok.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def dropout_model_dir(tmp_path_factory):
    """Factory: a tiny GPT-2 or OPT with dropout 0.1 everywhere, saved with its tokenizer.

    Weights are drawn with std 0.5 (not 0.02) so the logits are large and dropout moves the
    log-probs visibly: a train-mode forward with dropout on differs from an eval-mode one by
    far more than float noise.
    """
    cache: dict[str, str] = {}

    def make(arch: str = "gpt2") -> str:
        if arch not in cache:
            tok = ByT5Tokenizer()
            config = tiny_config(arch, len(tok))
            if arch == "gpt2":
                config.update({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                               "initializer_range": 0.5})
            else:
                config.update({"dropout": 0.1, "attention_dropout": 0.1, "init_std": 0.5})
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
            path = tmp_path_factory.mktemp(f"dropout-{arch}")
            model.save_pretrained(path)
            tok.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama reward model (one-label sequence classifier) with its tokenizer."""
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    config = tiny_config("llama", len(tok))
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # scores of order 1, so samples are told apart clearly
        model.score.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_rm_config(tmp_path, *overrides: str) -> RMConfig:
    """A reward-model config on the embedded task's pairs with a tiny model, for tests."""
    base = [f"output_dir={tmp_path / 'run'}", *CPU_FP32,
            *(f"model.embedded.{key}={value}" for key, value in TINY.items()),
            "task.num_pairs=2000", "task.num_eval=40", "data.max_length=24",
            "trainer.lr=3e-3", "trainer.max_steps=8", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.scheduler=constant"]
    return load_config(RMConfig, None, [*base, *overrides])


def tiny_sft_config(tmp_path, *overrides: str) -> SFTConfig:
    """An SFT config on the embedded task with a tiny model, fast enough for tests."""
    base = [f"output_dir={tmp_path / 'run'}", *CPU_FP32,
            f"model.embedded.hidden_size={TINY['hidden_size']}",
            f"model.embedded.num_layers={TINY['num_layers']}",
            f"model.embedded.num_heads={TINY['num_heads']}",
            f"model.embedded.intermediate_size={TINY['intermediate_size']}",
            "task.num_train=2000", "task.num_eval=40", "data.max_length=24",
            "trainer.lr=3e-3", "trainer.max_steps=8", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.scheduler=constant",
            "eval.max_samples=20"]
    return load_config(SFTConfig, None, [*base, *overrides])


def tiny_ppo_config(tmp_path, *overrides: str):
    """A PPO-family config on the embedded task with a tiny model (2 iterations)."""
    from align.config import PPOConfig

    base = [f"output_dir={tmp_path / 'run'}", *CPU_FP32,
            f"model.embedded.hidden_size={TINY['hidden_size']}",
            f"model.embedded.num_layers={TINY['num_layers']}",
            f"model.embedded.num_heads={TINY['num_heads']}",
            f"model.embedded.intermediate_size={TINY['intermediate_size']}",
            "task.num_train=200", "task.num_eval=16", "data.max_length=24",
            "rewards=[{spec: 'reward_models.builtin:format_reward'}]",
            "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
            "rollout.max_new_tokens=4", "trainer.lr=1e-3", "trainer.max_steps=2",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.log_every=1",
            "trainer.scheduler=constant", "eval.max_samples=8", "eval.max_new_tokens=4"]
    return load_config(PPOConfig, None, [*base, *overrides])


def tiny_dpo_config(tmp_path, *overrides: str):
    """A DPO config on the embedded task's pairs with a tiny model, fast enough for tests."""
    from align.config import DPOConfig

    base = [f"output_dir={tmp_path / 'run'}", *CPU_FP32,
            *(f"model.embedded.{key}={value}" for key, value in TINY.items()),
            "task.num_pairs=512", "task.num_eval=16", "data.max_length=24",
            "trainer.lr=3e-3", "trainer.max_steps=6", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=8", "trainer.log_every=1", "trainer.scheduler=constant",
            "eval.max_samples=16", "eval.max_new_tokens=4"]
    return load_config(DPOConfig, None, [*base, *overrides])


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """Factory: a tiny Llama, Qwen2 or GPT-2 saved with a ChatML tokenizer (tests/chat_models.py;
    GPT-2's pad is its EOS)."""
    from tests.chat_models import save_chat_model

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            cache[arch] = str(save_chat_model(arch, tmp_path_factory.mktemp(f"chat-{arch}")))
        return cache[arch]

    return make

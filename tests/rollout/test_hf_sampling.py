"""The `hf` engine samples exactly the policy whose log-probs the trainer computes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.policy import Policy
from align.rollout import Sampling
from align.rollout.hf_sampling import hf_sample
from align.rollout.verify import logprob_gap, shifted_logprobs
from align.trainers.ppo_objectives import response_mask, token_logprobs
from align.trainers.rollout import pad_sequences

# Settings a model folder may carry that change sampling but not the trainer's log-probs.
LEAKY = {"repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "top_k": 3, "min_p": 0.2,
         "eos_token_id": [1, 7]}


@pytest.fixture()
def leaky_model_dir(tiny_model_dir, tmp_path):
    path = tmp_path / "leaky"
    shutil.copytree(tiny_model_dir("llama"), path)
    (path / "generation_config.json").write_text(json.dumps(LEAKY))
    return str(path)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_log_probs_equal_the_trainers(leaky_model_dir, temperature):
    policy = Policy(ModelConfig(name_or_path=leaky_model_dir), TrainerConfig(),
                    DistributedConfig(), total_steps=1, trainable=False)
    assert policy.eos_ids == [1, 7]  # the folder's list, not only the tokenizer's EOS
    prompts = [[40, 41, 42], [50, 51]] * 8
    gen = policy.generate(prompts, Sampling(max_new_tokens=12, temperature=temperature,
                                            seed=0, logprobs=True))
    assert [len(lp) for lp in gen.logprobs] == [len(t) for t in gen.tokens]
    for tokens in gen.tokens:
        assert not {1, 7} & set(tokens[:-1])
    batch = pad_sequences(prompts, gen.tokens, pad_id=0)
    trainer = token_logprobs(policy.model, batch, temperature=temperature)
    engine = shifted_logprobs([len(p) for p in prompts], gen.logprobs,
                              batch["input_ids"].shape[1])
    mask = response_mask(batch)
    gap = logprob_gap(engine, trainer, mask)
    assert gap["rollout/logprob_diff_max"] < 1e-5, gap
    # The first PPO minibatch's ratio against the behaviour policy is exactly 1.
    ratio = torch.exp(trainer - engine)[mask.bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    # A repeated token would have been penalised (x3) or banned (n-gram 1) had they leaked.
    assert any(len(set(t)) < len(t) for t in gen.tokens)


@pytest.mark.parametrize(("arch", "new_tokens", "greedy", "repeats"),
                         [("llama", 6, False, 4), ("gpt2", 6, False, 4), ("opt", 6, False, 4),
                          ("llama", 1, False, 4), ("llama", 6, True, 4), ("llama", 6, False, 1)])
def test_prompts_are_prefilled_once_and_sample_as_without(tiny_model_dir, arch, new_tokens,
                                                          greedy, repeats, monkeypatch):
    """Through `generate` (models whose cache align's loop does not keep): a prompt sampled 4
    times runs its forward once, and its first token is drawn from that forward's logits; the
    samples and their log-probs are those `generate` gives alone (its own prefill of every
    row), under the same seed."""
    from align.rollout import hf_sampling

    monkeypatch.setattr(hf_sampling, "supports_growing_cache", lambda config: False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    # Left-padded to 4 in one batch; without repeats, 8 distinct prompts.
    prompts = ([[40, 41, 42, 43]] * repeats + [[50, 51]] * repeats if repeats > 1
               else [[40 + i, 41, 42, 43][: 2 + i % 3] for i in range(8)])
    sampling = Sampling(max_new_tokens=new_tokens, greedy=greedy, temperature=0.9,
                        logprobs=True)
    widths: list[tuple[int, int]] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: widths.append(tuple(args[0].shape)))

    def sample() -> tuple[list[list[int]], list[list[float]]]:
        torch.manual_seed(0)
        with torch.no_grad():
            return hf_sample(model, prompts, sampling, [1], 0, torch.device("cpu"))

    shared = sample()
    handle.remove()
    # The distinct prompts, then the first sampled token of every row (when one more is asked)
    assert widths == [(8 // repeats, 4)] + [(8, 1)] * (new_tokens - 1)
    monkeypatch.setattr(hf_sampling, "prefill_prompts", lambda *args: None)
    alone = sample()
    assert shared[0] == alone[0]
    for got, want in zip(*[lp for _, lp in (shared, alone)]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
    assert all(len(t) == new_tokens for t in shared[0])  # no row drew EOS (id 1) under this seed
    if repeats > 1:  # the repeats sampled apart (or, greedy, alike)
        assert len({tuple(t) for t in shared[0][:4]}) == (1 if sampling.greedy else 4)


def test_prefill_computes_each_distinct_prompt_once(tiny_model_dir):
    from align.rollout.hf_sampling import prefill_prompts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    widths: list[int] = []
    model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: widths.append(args[0].shape[0]))
    ids = torch.tensor([[3, 4], [5, 6], [3, 4]])
    cache, logits = prefill_prompts(model, ids, torch.ones(3, 2, dtype=torch.long))
    assert widths == [2]
    assert cache.get_seq_length() == 2 and cache.layers[0].keys.shape[0] == 3
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    assert torch.equal(logits[0], logits[2]) and not torch.equal(logits[0], logits[1])
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert prefill_prompts(model, empty, empty) is None  # `generate` prefills them itself


def test_decoding_threads_follow_the_work_of_a_step(tiny_model_dir):
    """One CPU thread per DECODE_FLOPS_PER_THREAD of a decoding step, within 1 and torch's
    count; the count is restored after generation."""
    from align.rollout.hf_sampling import DECODE_FLOPS_PER_THREAD, cpu_threads, decoding_threads

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    params = sum(p.numel() for p in model.parameters())
    rows_per_thread = int(DECODE_FLOPS_PER_THREAD // (2 * params)) + 1
    with cpu_threads(4):
        assert decoding_threads(model, 1) == 1
        assert decoding_threads(model, 3 * rows_per_thread) == 3
        assert decoding_threads(model, 100 * rows_per_thread) == 4
        seen: list[int] = []
        handle = model.get_input_embeddings().register_forward_hook(
            lambda *_: seen.append(torch.get_num_threads()))
        with torch.no_grad():
            hf_sample(model, [[40, 41]] * 4, Sampling(max_new_tokens=3), [1], 0,
                      torch.device("cpu"))
        handle.remove()
        assert seen == [4, 1, 1] and torch.get_num_threads() == 4  # prefill, then decoding

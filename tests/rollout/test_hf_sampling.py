"""The `hf` engine samples exactly the policy whose log-probs the trainer computes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.policy import Policy
from align.rollout import Sampling
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

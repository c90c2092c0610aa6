"""A trained reward-model folder as a reward spec: the numbers the model computes directly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from align.errors import ConfigError, RewardError
from reward_models import RewardModelScorer, load_reward
from reward_models.reward_model import score_texts

PROMPTS = ["Q: 23+58=", "Q: 10+10=", "Q: 99+99=", "Q: 40+2="]
COMPLETIONS = [" 81", " 20", " 198 and some more words", " 4"]  # lengths differ: padding
# In-process scoring in fp32 whatever the host (`dtype: auto` is bf16 on a GPU).
IN_PROCESS = {"num_workers": 0, "dtype": "float32"}


def direct(folder: str, prompts: list[str], completions: list[str]) -> list[float]:
    return direct_scores(AutoModelForSequenceClassification.from_pretrained(folder),
                         AutoTokenizer.from_pretrained(folder), prompts, completions)


def direct_scores(model, tok, prompts: list[str], completions: list[str],
                  truncated: list[bool] | None = None) -> list[float]:
    """Plain transformers, one unpadded sequence at a time: prompt + completion + EOS (no EOS
    where `truncated`)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):
            end = [] if truncated and truncated[i] else [tok.eos_token_id]
            ids = (tok(p, add_special_tokens=False).input_ids
                   + tok(c, add_special_tokens=False).input_ids + end)
            out.append(model(torch.tensor([ids])).logits[0, 0].item())
    return out


def test_in_process_scores_match_the_model(tiny_reward_model_dir):
    reward = load_reward({"spec": tiny_reward_model_dir, "kwargs": IN_PROCESS})
    assert isinstance(reward.fn, RewardModelScorer)
    expected = direct(tiny_reward_model_dir, PROMPTS, COMPLETIONS)
    assert len(set(expected)) == len(expected)  # the samples really are told apart
    assert reward(PROMPTS, COMPLETIONS, answer=["81", "20", "198", "42"]) == pytest.approx(
        expected, abs=1e-5)


def test_truncated_completions_are_scored_as_they_are(tiny_reward_model_dir):
    """A completion that hit its token budget gets no EOS: the model can tell it from one that
    ended (the trainer passes `completion_truncated`)."""
    reward = load_reward({"spec": tiny_reward_model_dir, "kwargs": IN_PROCESS})
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    truncated = [False, True, False, True]
    expected = direct_scores(model, tok, PROMPTS, COMPLETIONS, truncated)
    ended = direct_scores(model, tok, PROMPTS, COMPLETIONS)
    assert expected[1] != pytest.approx(ended[1], abs=1e-3)  # EOS or not changes the score
    got = reward(PROMPTS, COMPLETIONS, completion_truncated=truncated)
    assert got == pytest.approx(expected, abs=1e-5)
    with pytest.raises(RewardError, match="completion_truncated"):
        reward(PROMPTS, COMPLETIONS, completion_truncated=[True])


def test_batching_does_not_change_scores(tiny_reward_model_dir):
    scorer = RewardModelScorer(tiny_reward_model_dir, num_workers=0)
    together = score_texts(scorer.model, scorer.tokenizer, PROMPTS, COMPLETIONS, batch_size=4)
    alone = score_texts(scorer.model, scorer.tokenizer, PROMPTS, COMPLETIONS, batch_size=1)
    assert together == pytest.approx(alone, abs=1e-5)


def test_causal_lm_folder_is_not_a_reward_model(tiny_model_dir):
    with pytest.raises(RewardError, match=r"LlamaForCausalLM.*not a reward model"):
        load_reward(tiny_model_dir("llama"))


def test_unknown_option_suggests_the_closest(tiny_reward_model_dir):
    with pytest.raises(ConfigError, match=r"'num_worker'.*did you mean 'num_workers'"):
        load_reward({"spec": tiny_reward_model_dir, "kwargs": {"num_worker": 2}})


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_actor_group_scores_match_the_model(tiny_reward_model_dir, ray_local, workers):
    reward = load_reward({"spec": tiny_reward_model_dir,
                          "kwargs": {"num_workers": workers, "cpus_per_worker": 0.5}})
    try:
        assert reward.fn.group.size == workers
        expected = direct(tiny_reward_model_dir, PROMPTS, COMPLETIONS)
        assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)
        assert reward(PROMPTS[:1], COMPLETIONS[:1]) == pytest.approx(expected[:1], abs=1e-5)
        truncated = [True, False, False, True]  # each rank's shard gets its own flags
        model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
        tok = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
        assert reward(PROMPTS, COMPLETIONS, completion_truncated=truncated) == pytest.approx(
            direct_scores(model, tok, PROMPTS, COMPLETIONS, truncated), abs=1e-5)
    finally:
        reward.fn.close()

"""The PPO trainer's worker-side parts on their own (no Ray): token log-probs at a sampling
temperature, and critic values at every position."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align.losses import IGNORE_INDEX
from align.trainers.ppo_objectives import token_logprobs, token_values

# --------------------------------------------------------------------------- log-probs


def rollout_batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows: a 3-token prompt, then 3 and 1 generated tokens."""
    ids = torch.tensor([[5, 40, 41, 60, 61, 1], [5, 42, 43, 62, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:6], labels[1, 3:4] = ids[0, 3:6], ids[1, 3:4]
    return {"input_ids": ids, "attention_mask": (torch.arange(6) < torch.tensor([[6], [4]])).long(),
            "labels": labels}


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_token_logprobs_are_those_of_the_sampled_distribution(tiny_model_dir, temperature):
    """Position t holds log softmax(logits / T) of generated token t+1, computed here by hand
    from an unpadded forward over the prefix; 0 where no token was generated."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    batch = rollout_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    expected = torch.zeros(2, 5)
    with torch.no_grad():
        got = token_logprobs(model, batch, temperature=temperature)
        for row in range(2):
            for t in range(5):
                if labels[row, t + 1] != IGNORE_INDEX:
                    logits = model(input_ids=ids[row, :t + 1][None]).logits[0, -1].double()
                    expected[row, t] = torch.log_softmax(logits / temperature, -1)[ids[row, t + 1]]
    assert int((expected != 0).sum()) == 4  # three generated tokens, then one
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_critic_values_are_the_head_at_every_position(tiny_reward_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    batch = rollout_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        values = token_values(model, batch)
        hidden = model.model(**inputs).last_hidden_state
        expected = model.score(hidden)[..., 0][:, :-1]
        score = model(**inputs).logits[1, 0]  # the model's own score: row 1's last real token
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(values[1, 3], score)

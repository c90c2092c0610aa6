"""A reward model trained on conversational pairs scores PPO's conversational samples on the very
token ids it was trained on, for ChatML (Qwen 2.5's template) and Llama 3's template.

PPO hands rewards the prompt rendered with the chat template and the decoded completion (the
template's end-of-turn tokens removed); training rendered prompt + completion with the template,
so the score was learnt after the template's end of turn (`<|im_end|>\\n` for ChatML), never at
an EOS appended to the decoded text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import reward_models.reward_model as reward_model
from align.config import ModelConfig
from align.data.preference import PreferenceExample, tokenize_preference
from align.data.prompts import tokenize_prompts
from align.data.text import encode
from align.model_loading import load_tokenizer
from align.reward_columns import COMPLETION_IDS_COLUMN, TRUNCATED_COLUMN
from align.rollout.base import Generation
from align.trainers.rollout import assemble_rollout, completion_ids
from reward_models import load_reward
from reward_models.server import RewardModelServer
from tests.chat_models import chat_config, chatml_tokenizer, llama3_tokenizer, trl_template

pytest.importorskip("trl")

PROMPT = [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "What is 2+2?"}]
ENDED = ["4", " The answer is 4.\n"]  # Llama 3's template trims the second
CUT = "The answer is"  # stopped at its token budget


def qwen_tokenizer():
    tokenizer = chatml_tokenizer("qwen2")
    tokenizer.chat_template = trl_template("qwen2_5")
    return tokenizer


TEMPLATES = {"chatml": qwen_tokenizer, "llama3": llama3_tokenizer}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def reward_folder(request, tmp_path_factory) -> str:
    """A tiny random reward model saved with the template's tokenizer, as `align rm` saves one."""
    tokenizer = TEMPLATES[request.param]()
    config = chat_config("llama", tokenizer)
    config.num_labels = 1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"rm-{request.param}")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def ppo_call(tokenizer, completions: list[str], ended: bool) -> tuple[list, list, dict]:
    """The reward call of a PPO rollout of PROMPT whose samples are `completions`, each ended
    by the policy's EOS (the template's end of turn) or cut at its token budget."""
    examples = tokenize_prompts([{"prompt": PROMPT}], tokenizer, 256, "rl.jsonl")
    eos = tokenizer.eos_token_id
    tokens = [encode(tokenizer, c) + ([eos] if ended else []) for c in completions]
    rollout = assemble_rollout(tokenizer, examples, len(completions), Generation(tokens, None),
                               [eos])
    columns = {COMPLETION_IDS_COLUMN: completion_ids(rollout), **rollout.columns,
               TRUNCATED_COLUMN: rollout.truncated}
    return rollout.prompts, rollout.completions, columns


def trained_pair(tokenizer, completion: str, max_length: int = 256) -> PreferenceExample:
    """The pair `align rm` trains on for PROMPT answered with `completion` (as chosen)."""
    row = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": completion}],
           "rejected": [{"role": "assistant", "content": "no idea"}]}
    (pair,) = tokenize_preference([row], tokenizer, max_length)
    return pair


def trained_ids(tokenizer, completion: str, max_length: int = 256) -> list[int]:
    """The token ids of the chosen sequence `align rm` trains on (prompt + completion)."""
    pair = trained_pair(tokenizer, completion, max_length)
    return pair.prompt_ids + pair.chosen_ids


def scored_ids(monkeypatch, score) -> list[list[int]]:
    """The token ids of every sequence the reward model reads while `score()` runs."""
    seen: list[list[int]] = []
    collate = reward_model.collate_sequences

    def recording(sequences, pad_id):
        seen.extend(list(s) for s in sequences)
        return collate(sequences, pad_id)

    monkeypatch.setattr(reward_model, "collate_sequences", recording)
    score()
    return seen


def test_a_ppo_sample_is_scored_on_the_ids_the_model_was_trained_on(monkeypatch,
                                                                    reward_folder):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=reward_folder))
    prompts, completions, columns = ppo_call(tokenizer, ENDED, ended=True)
    reward = load_reward({"spec": reward_folder, "kwargs": {"num_workers": 0}})
    seen = scored_ids(monkeypatch, lambda: reward(prompts, completions, **columns))
    assert seen == [trained_ids(tokenizer, c) for c in ENDED]


def test_a_completion_cut_at_its_budget_is_scored_as_training_cuts_one(monkeypatch,
                                                                       reward_folder):
    """Training cuts a pair over max_length without closing the turn; a PPO sample that hit
    its token budget is scored the same way, the turn left open."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=reward_folder))
    prompts, completions, columns = ppo_call(tokenizer, [CUT], ended=False)
    assert columns[TRUNCATED_COLUMN] == [True]
    reward = load_reward({"spec": reward_folder, "kwargs": {"num_workers": 0}})
    seen = scored_ids(monkeypatch, lambda: reward(prompts, completions, **columns))
    whole = trained_pair(tokenizer, CUT)
    cut_at = len(whole.prompt_ids) + len(encode(tokenizer, CUT))  # before the end of turn
    assert len(whole.prompt_ids + whole.chosen_ids) > cut_at
    assert seen == [trained_ids(tokenizer, CUT, max_length=cut_at)]


def test_the_served_model_scores_the_same_ids(monkeypatch, reward_folder):
    """`align serve-rm` gets the batch as the URL reward sends it, `prompt_messages`
    included."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=reward_folder))
    prompts, completions, columns = ppo_call(tokenizer, ENDED, ended=True)
    server = RewardModelServer(("127.0.0.1", 0), reward_folder)
    try:
        body = {"prompts": prompts, "completions": completions, **columns}
        seen = scored_ids(monkeypatch, lambda: server.score(body))
    finally:
        server.server_close()
    assert seen == [trained_ids(tokenizer, c) for c in ENDED]


@pytest.mark.slow
def test_ray_workers_score_as_the_calling_process(reward_folder, ray_local):
    """Each worker gets its shard's `prompt_messages` with its prompts."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=reward_folder))
    prompts, completions, columns = ppo_call(tokenizer, ENDED, ended=True)
    here = load_reward({"spec": reward_folder, "kwargs": {"num_workers": 0}})
    workers = load_reward({"spec": reward_folder,
                           "kwargs": {"num_workers": 2, "cpus_per_worker": 0.5}})
    try:
        assert workers(prompts, completions, **columns) == pytest.approx(
            here(prompts, completions, **columns), abs=1e-5)
    finally:
        workers.fn.close()

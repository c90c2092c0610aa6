"""Rewards on conversational prompts receive TRL's form: message-list prompts, completions as
`[{"role": "assistant", "content": ...}]`, and `completion_ids`; TRL's own rewards plug in."""

from __future__ import annotations

import pytest

from align.data.prompts import reward_columns, tokenize_prompts
from align.errors import DataError
from reward_models import CombinedReward, load_reward
from tests.chat_models import chatml_tokenizer

pytest.importorskip("trl")

ROWS = [{"prompt": [{"role": "user", "content": "Think, then answer."}], "answer": "4"},
        {"prompt": "Q: 2+2=", "answer": "4"}]  # one conversational row, one plain


def batch(completions: list[str]):
    """The reward call for ROWS with `completions`, as the PPO trainer builds it."""
    tokenizer = chatml_tokenizer("qwen2")
    examples = tokenize_prompts(ROWS, tokenizer, max_length=128, source="rl.jsonl")
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for c in completions]
    return ([e.text for e in examples], completions,
            {"completion_ids": ids, **reward_columns(examples)})


def test_prompt_rows_of_messages_render_with_the_generation_prompt():
    prompts, _, columns = batch(["a", "b"])
    assert prompts[0] == ("<|im_start|>user\nThink, then answer.<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert columns["prompt_messages"] == [ROWS[0]["prompt"], None]
    assert columns["answer"] == ["4", "4"]


SEEN: list[tuple] = []


def probe(prompts, completions, completion_ids, **kwargs):
    """A TRL-style reward that records what it receives."""
    SEEN.append((prompts, completions, completion_ids, sorted(kwargs)))
    return [0.0] * len(prompts)


def test_a_trl_function_receives_trls_conversational_form():
    SEEN.clear()
    reward = load_reward(f"{__name__}:probe")
    prompts, completions, columns = batch(["<think>x</think>4", " 4"])
    reward(prompts, completions, **columns)
    got_prompts, got_completions, got_ids, names = SEEN[0]
    assert got_prompts == [ROWS[0]["prompt"], "Q: 2+2="]
    assert got_completions == [[{"role": "assistant", "content": "<think>x</think>4"}], " 4"]
    assert got_ids == columns["completion_ids"]
    assert names == ["answer"]  # prompt_messages is not passed on


def test_trls_think_format_and_soft_overlong_rewards_score_as_in_trl(tmp_path):
    (tmp_path / "overlong.py").write_text(
        "from trl.rewards import get_soft_overlong_punishment\n"
        "overlong = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)\n")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    tokenizer = chatml_tokenizer("qwen2")
    examples = tokenize_prompts(rows, tokenizer, max_length=128)
    completions = ["<think>ok</think>4", "no tags", "<think>a</think><think>b</think>"]
    ids = [[5] * n for n in (3, 6, 9)]  # free up to 4 tokens; 6 -> -0.5; beyond 8 -> -1
    rewards = CombinedReward.from_specs(["trl.rewards:think_format_reward",
                                         f"{tmp_path / 'overlong.py'}:overlong"])
    scores = rewards.score([e.text for e in examples], completions, completion_ids=ids,
                           **reward_columns(examples))
    assert scores.per_reward["think_format_reward"] == [1.0, 0.0, 0.0]
    assert scores.per_reward["overlong"] == pytest.approx([0.0, -0.5, -1.0])


def test_a_dataset_column_named_like_a_trainer_column_is_refused():
    with pytest.raises(DataError, match=r"rl.jsonl.*row 2.*completion_ids"):
        tokenize_prompts([{"prompt": "a"}, {"prompt": "b", "completion_ids": [1]}],
                         chatml_tokenizer("llama"), 64, "rl.jsonl")

"""Hard-negative mining for the reward model: pairing rules, then `align rm` with mining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.errors import ConfigError
from align.trainers.mining import build_pairs
from align.trainers.reward import RewardTrainer
from reward_models import load_reward
from tests.conftest import tiny_rm_config

LETTERS = Path(__file__).with_name("letter_reward.py")


def test_pairs_put_the_most_frequent_best_against_the_most_frequent_worse():
    groups = [
        [(" 9", 0.5), (" 81x", 1.0), (" 7", 0.0), (" 81", 1.0), (" 71", 0.0), (" 81", 1.0),
         (" 71", 0.0), (" 7", 0.0), (" 71", 0.0)],
        [(" 3", 1.0), (" 3", 1.0)],  # all equal: nothing to learn from
        [],  # no samples
    ]
    rows = build_pairs(["Q: 23+58=", "Q: 1+2=", "Q: 5+5="], groups, pairs_per_prompt=2)
    assert rows == [{"prompt": "Q: 23+58=", "chosen": " 81", "rejected": " 71"},
                    {"prompt": "Q: 23+58=", "chosen": " 81", "rejected": " 7"}]


def test_message_prompts_get_assistant_messages():
    prompt = [{"role": "user", "content": "2+2?"}]
    rows = build_pairs([prompt], [[("4", 1.0), ("5", 0.0)]], 1)
    assert rows == [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "assistant", "content": "5"}]}]


def test_mining_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="mining.samples_per_prompt"):
        tiny_rm_config(tmp_path, "mining.policy=x", "mining.samples_per_prompt=1")
    with pytest.raises(ConfigError, match="mining.prompts"):
        tiny_rm_config(tmp_path, "mining.policy=x", "data.train=pairs.jsonl")


@pytest.mark.slow
def test_rm_trains_on_pairs_mined_from_the_policy(tmp_path, tiny_model_dir, ray_local):
    """A random tiny policy's samples, labelled by the share of lower-case letters: every
    mined pair's chosen text scores higher than its rejected one, the pairs are written and
    trained on, and the trained model ranks them."""
    policy = tiny_model_dir("llama")
    cfg = tiny_rm_config(tmp_path, f"model.name_or_path={policy}", f"mining.policy={policy}",
                         f"mining.reward={LETTERS}:lowercase_share", "mining.num_prompts=24",
                         "mining.samples_per_prompt=4", "mining.max_new_tokens=6",
                         "task.num_pairs=16", "trainer.max_steps=12", "trainer.lr=1e-2")
    summary = RewardTrainer(cfg, show_progress=False).fit()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "mined_pairs.jsonl").open()]
    assert len(rows) == summary["mining/pairs"] > 0
    assert summary["mining/samples"] == 96
    verifier = load_reward(f"{LETTERS}:lowercase_share")
    prompts = [r["prompt"] for r in rows]
    chosen = verifier(prompts, [r["chosen"] for r in rows])
    rejected = verifier(prompts, [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected))
    scorer = load_reward(str(Path(cfg.output_dir) / "final"))
    try:
        mined_c = scorer(prompts, [r["chosen"] for r in rows])
        mined_r = scorer(prompts, [r["rejected"] for r in rows])
    finally:
        scorer.close()
    accuracy = sum(c > r for c, r in zip(mined_c, mined_r)) / len(rows)
    assert accuracy > 0.75, accuracy  # 16 task pairs alone do not teach these

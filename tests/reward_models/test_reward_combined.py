"""CombinedReward: weighted sums, None semantics, per-reward values and metrics."""

from __future__ import annotations

import pickle
import textwrap

import pytest

from align.errors import ConfigError, RewardError
from reward_models import CombinedReward, RewardSpec

PROMPTS = ["Q: 23+58=", "Q: 1+2=", "Q: 99+99="]
COMPLETIONS = [" 81</s>", " 4", " 198 is the answer"]
ANSWERS = ["81", "3", "198"]

PARTIAL_REWARDS = """
    import asyncio

    def only_first(prompts, completions, **kwargs):
        return [5.0] + [None] * (len(completions) - 1)

    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    async def async_const(prompts, completions, **kwargs):
        await asyncio.sleep(0.01)
        return [0.5] * len(completions)
"""


@pytest.fixture
def partial_file(tmp_path):
    (tmp_path / "partial.py").write_text(textwrap.dedent(PARTIAL_REWARDS))
    return tmp_path


def test_weighted_sum_and_per_reward_values():
    combined = CombinedReward.from_specs(
        [
            "reward_models.builtin:exact_match",
            {"spec": "reward_models.builtin:format_reward", "weight": 0.5, "name": "format"},
            RewardSpec(
                "reward_models.builtin:length_penalty",
                weight=2.0,
                kwargs={"target_chars": 4, "per_char": 0.1},
            ),
        ]
    )
    scores = combined.score(PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert scores.per_reward == {
        "exact_match": [1.0, 0.0, 0.0],
        "format": [1.0, 1.0, 0.0],
        "length_penalty": [0.0, 0.0, pytest.approx(-1.3)],  # 17 chars, 13 over the target
    }
    # 1*1 + 0.5*1 + 2*0 | 0 + 0.5 + 0 | 0 + 0 + 2*(-1.3)
    assert scores.total == pytest.approx([1.5, 0.5, -2.6])
    assert combined(PROMPTS, COMPLETIONS, answer=ANSWERS) == pytest.approx([1.5, 0.5, -2.6])
    metrics = scores.metrics()
    assert metrics["rewards/exact_match/mean"] == pytest.approx(1 / 3)
    assert metrics["rewards/format/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/mean"] == pytest.approx((1.5 + 0.5 - 2.6) / 3)


def test_none_contributes_nothing_and_async_runs(partial_file):
    combined = CombinedReward.from_specs(
        [{"spec": "partial.py:only_first", "weight": 2.0}, "partial.py:async_const"],
        base_dir=partial_file,
    )
    scores = combined.score(PROMPTS, COMPLETIONS)
    assert scores.per_reward["only_first"] == [5.0, None, None]
    assert scores.total == [10.5, 0.5, 0.5]
    metrics = scores.metrics()
    assert metrics["rewards/only_first/mean"] == 5.0
    assert metrics["rewards/only_first/applied"] == pytest.approx(1 / 3)


def test_sample_every_reward_skips_is_an_error(partial_file):
    combined = CombinedReward.from_specs(
        ["partial.py:only_first", "partial.py:never"], base_dir=partial_file
    )
    with pytest.raises(
        RewardError, match=r"every reward returned None for sample 1 .*'partial\.py:never'"
    ):
        combined(PROMPTS, COMPLETIONS)


def test_duplicate_names(tmp_path):
    combined = CombinedReward.from_specs(
        ["reward_models.builtin:exact_match", "reward_models.builtin:exact_match"]
    )
    assert combined.names == ["exact_match", "exact_match_2"]
    assert pickle.loads(pickle.dumps(combined)).names == ["exact_match", "exact_match_2"]
    with pytest.raises(ConfigError, match="both named 'x'"):
        CombinedReward.from_specs(
            [
                {"spec": "reward_models.builtin:exact_match", "name": "x"},
                {"spec": "reward_models.builtin:format_reward", "name": "x"},
            ]
        )


def test_bad_weight_and_empty_list():
    with pytest.raises(ConfigError, match=r"'reward_models.builtin:exact_match'.*weight must be"):
        CombinedReward.from_specs([{"spec": "reward_models.builtin:exact_match", "weight": "1"}])
    with pytest.raises(ConfigError, match=r"rewards\[1\]: reward 'nope\.py:fn'.*does not exist"):
        CombinedReward.from_specs(["reward_models.builtin:exact_match", "nope.py:fn"])
    with pytest.raises(ConfigError, match="at least one reward"):
        CombinedReward.from_specs([])


def test_a_weighted_total_past_the_limit_is_refused(tmp_path):
    (tmp_path / "big.py").write_text("def big(prompts, completions, **kw):\n"
                                     "    return [9e14] * len(completions)\n")
    combined = CombinedReward.from_specs([{"spec": f"{tmp_path}/big.py:big", "weight": 2.0}])
    with pytest.raises(RewardError, match=r"weighted reward of sample 0 .* is 1.8e\+15 "
                                          r"\('.*big.py:big': 2 x 9e\+14\); it must lie within"):
        combined.score(PROMPTS[:1], COMPLETIONS[:1])

"""Reward output checks: every bad output is a RewardError naming the spec (and the sample)."""

from __future__ import annotations

import textwrap

import pytest

from align.errors import RewardError
from reward_models import load_reward

BAD_REWARDS = """
    import math

    def raises(prompts, completions, **kwargs):
        raise ValueError("cannot parse " + completions[0])

    def too_short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    def not_a_list(prompts, completions, **kwargs):
        return 1.0

    def returns_text(prompts, completions, **kwargs):
        return [1.0, "high", 0.0]

    def returns_nan(prompts, completions, **kwargs):
        return [0.0, 1.0, math.nan]

    def returns_inf(prompts, completions, **kwargs):
        return [0.0, -math.inf, 1.0]

    def needs_answer(prompts, completions, answer):
        return [1.0] * len(completions)

    async def async_raises(prompts, completions, **kwargs):
        raise KeyError("missing key")

    def verl_raises(data_source, solution_str, ground_truth, extra_info=None):
        return 1.0 / int(solution_str)

    def verl_no_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"acc": 1.0}
"""

PROMPTS = ["Q: 1+1=", "Q: 2+2=", "Q: 3+3="]
COMPLETIONS = [" 2", " 0", " 6"]


@pytest.fixture
def bad_file(tmp_path):
    (tmp_path / "bad.py").write_text(textwrap.dedent(BAD_REWARDS))
    return tmp_path


def score(folder, spec: str, **columns):
    return load_reward(spec, base_dir=folder)(PROMPTS, COMPLETIONS, **columns)


def test_raising_reward_is_chained_and_names_spec(bad_file):
    with pytest.raises(RewardError, match=r"'bad\.py:raises' raised ValueError: cannot parse  2"):
        score(bad_file, "bad.py:raises")
    try:
        score(bad_file, "bad.py:raises")
    except RewardError as err:
        assert isinstance(err.__cause__, ValueError)


def test_async_raising_reward(bad_file):
    with pytest.raises(RewardError, match=r"'bad\.py:async_raises' raised KeyError") as info:
        score(bad_file, "bad.py:async_raises")
    assert isinstance(info.value.__cause__, KeyError)


def test_wrong_length(bad_file):
    with pytest.raises(RewardError, match=r"'bad\.py:too_short' returned 2 values for 3 samples"):
        score(bad_file, "bad.py:too_short")


def test_not_a_list(bad_file):
    with pytest.raises(RewardError, match=r"'bad\.py:not_a_list' returned float, expected a list"):
        score(bad_file, "bad.py:not_a_list")


def test_non_number_names_sample(bad_file):
    with pytest.raises(
        RewardError, match=r"'bad\.py:returns_text' returned str 'high' for sample 1"
    ):
        score(bad_file, "bad.py:returns_text")


def test_nan_names_sample(bad_file):
    with pytest.raises(
        RewardError, match=r"'bad\.py:returns_nan' returned nan for sample 2 \(prompt 'Q: 3\+3='\)"
    ):
        score(bad_file, "bad.py:returns_nan")


def test_inf_names_sample(bad_file):
    with pytest.raises(RewardError, match=r"'bad\.py:returns_inf' returned -inf for sample 1"):
        score(bad_file, "bad.py:returns_inf")


def test_missing_column_is_named(bad_file):
    with pytest.raises(
        RewardError, match=r"'bad\.py:needs_answer'.*needs column\(s\) \['answer'\].*\['label'\]"
    ):
        score(bad_file, "bad.py:needs_answer", label=["2", "4", "6"])


def test_verl_per_sample_error_names_sample(bad_file):
    with pytest.raises(
        RewardError, match=r"'verl:bad\.py:verl_raises'.*sample 1.*ZeroDivisionError"
    ) as info:
        score(bad_file, "verl:bad.py:verl_raises", ground_truth=["2", "4", "6"])
    assert isinstance(info.value.__cause__, RewardError)
    assert isinstance(info.value.__cause__.__cause__, ZeroDivisionError)


def test_verl_dict_without_score(bad_file):
    with pytest.raises(
        RewardError, match=r"'verl:bad\.py:verl_no_score'.*without 'score'.*sample 0"
    ):
        score(bad_file, "verl:bad.py:verl_no_score", ground_truth=["2", "4", "6"])


def test_column_length_mismatch_is_named():
    reward = load_reward("reward_models.builtin:exact_match")
    with pytest.raises(
        RewardError, match=r"'reward_models.builtin:exact_match': column 'answer' has 2 values"
    ):
        reward(PROMPTS, COMPLETIONS, answer=["2", "4"])

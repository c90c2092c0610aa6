"""Reward shaping (running normalisation, clipping) and ensembles, against hand-computed values."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from align.errors import ConfigError
from reward_models import CombinedReward, RewardSpec
from reward_models.robust import EnsembleReward, RewardShaping, ensemble_values

MEMBERS = """
    def a(prompts, completions, **kw):
        return [1.0, 2.0, 0.0][:len(completions)]

    def b(prompts, completions, **kw):
        return [3.0, 2.0, None][:len(completions)]

    def c(prompts, completions, **kw):
        return [2.0, 2.0, 1.0][:len(completions)]
"""


def test_normalisation_uses_the_window_with_this_batch_included():
    shape = RewardShaping(normalize=True, window=4)
    # first batch [1, 3]: mean 2, std 1 -> [-1, 1]
    assert shape([1.0, 3.0]) == pytest.approx([-1.0, 1.0], abs=1e-6)
    # window [1, 3, 5, 7]: mean 4, std sqrt(5) -> (5-4)/sqrt(5), (7-4)/sqrt(5)
    assert shape([5.0, 7.0]) == pytest.approx([1 / math.sqrt(5), 3 / math.sqrt(5)], abs=1e-6)
    # None is skipped; the window keeps the latest 4, [3, 5, 7, 9]: mean 6, std sqrt(5)
    assert shape([9.0, None]) == pytest.approx([3 / math.sqrt(5), None], abs=1e-6)
    assert list(shape.values) == [3.0, 5.0, 7.0, 9.0]


def test_evaluation_reads_the_statistics_without_updating_them():
    shape = RewardShaping(normalize=True, window=10)
    shape([0.0, 2.0])  # mean 1, std 1
    assert shape([3.0], update=False) == pytest.approx([2.0], abs=1e-6)
    assert list(shape.values) == [0.0, 2.0]


def test_clipping_applies_after_normalising():
    shape = RewardShaping(normalize=True, window=10, clip=[-0.5, 0.5])
    assert shape([1.0, 3.0]) == pytest.approx([-0.5, 0.5])
    only_clip = RewardShaping(clip=(0.0, 2.5))
    assert only_clip([-1.0, 1.0, 7.0]) == [0.0, 1.0, 2.5]


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 1}, "normalize_window"),
    ({"clip": [2.0, 1.0]}, "clip must be"),
    ({"clip": [0.0, float("inf")]}, "clip must be"),
    ({"clip": [1.0]}, "clip must be"),
])
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RewardShaping(normalize=True, label="rm", **kwargs)


def test_combined_reward_shapes_then_weights_and_round_trips_its_state():
    spec = {"spec": "reward_models.builtin:exact_match", "weight": 2.0, "normalize": True,
            "normalize_window": 8}
    combined = CombinedReward.from_specs([spec])
    prompts, answers = ["Q: 1+1=", "Q: 2+2="], ["2", "4"]
    scores = combined.score(prompts, [" 2", " 5"], answer=answers)
    # raw [1, 0]: mean 0.5, std 0.5 -> [1, -1], times weight 2
    assert scores.total == pytest.approx([2.0, -2.0], abs=1e-5)
    assert scores.per_reward["exact_match"] == [1.0, 0.0]  # logged raw
    assert scores.metrics()["rewards/exact_match/shaped_mean"] == pytest.approx(0.0, abs=1e-6)
    state = json.loads(json.dumps(combined.state()))
    again = CombinedReward.from_specs([spec])
    again.load(state)
    # evaluation: the statistics are read ([1, 0]), not updated
    assert again(prompts, [" 2", " 4"], answer=answers) == pytest.approx([2.0, 2.0], abs=1e-5)
    assert again.state() == state


def test_ensemble_is_mean_minus_k_std():
    scores, spreads = ensemble_values([[1.0, 2.0, 0.0], [3.0, 2.0, None], [2.0, 2.0, 1.0]],
                                      penalty=0.5)
    std = math.sqrt(2 / 3)  # of 1, 3, 2
    assert scores[0] == pytest.approx(2.0 - 0.5 * std)
    assert spreads[0] == pytest.approx(std)
    assert scores[1] == pytest.approx(2.0) and spreads[1] == 0.0
    assert scores[2] is None and spreads[2] is None


def test_an_ensemble_entry_loads_its_members_and_logs_their_spread(tmp_path):
    (tmp_path / "members.py").write_text(textwrap.dedent(MEMBERS))
    spec = {"spec": [f"{tmp_path}/members.py:a", f"{tmp_path}/members.py:b"],
            "name": "rm", "uncertainty_penalty": 2.0}
    combined = CombinedReward.from_specs([spec])
    scores = combined.score(["p", "q"], ["x", "y"])
    # members [1, 3] and [2, 2]: means 2, 2; stds 1, 0
    assert scores.total == pytest.approx([2.0 - 2.0 * 1.0, 2.0])
    assert scores.metrics()["rewards/rm/std_across_models"] == pytest.approx(0.5)
    assert RewardSpec.coerce(spec).label.startswith("[")


def test_an_ensemble_needs_two_members_and_a_valid_penalty():
    with pytest.raises(ConfigError, match="at least two"):
        RewardSpec(["reward_models.builtin:exact_match"])
    with pytest.raises(ConfigError, match="uncertainty_penalty"):
        EnsembleReward([len, len], penalty=-1.0)

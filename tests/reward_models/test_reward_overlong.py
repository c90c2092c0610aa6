"""reward_models.builtin:overlong_penalty, DAPO's soft overlong punishment, against TRL."""

from __future__ import annotations

import pytest

from align.errors import RewardError
from reward_models import builtin, load_reward


def test_overlong_penalty_hand_values_from_token_ids():
    ids = [[7] * n for n in (3, 4, 5, 6, 7)]  # max_length 6, soft buffer 2: free up to 4
    values = builtin.overlong_penalty([""] * 5, [""] * 5, max_length=6, soft_buffer=2,
                                      completion_ids=ids)
    assert values == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_overlong_penalty_without_ids_counts_characters():
    assert builtin.overlong_penalty(["Q: 1+2="] * 2, [" 3", " 33333"], max_length=4,
                                    soft_buffer=2) == pytest.approx([0.0, -1.0])


@pytest.mark.parametrize(("max_length", "soft_buffer"), [(6, 2), (10, 4), (5, 0), (3, 3)])
def test_overlong_penalty_matches_trl(max_length, soft_buffer):
    pytest.importorskip("trl")
    from trl.rewards import get_soft_overlong_punishment

    ids = [[1] * n for n in range(0, 14)]
    trl = get_soft_overlong_punishment(max_length, soft_buffer)(completion_ids=ids)
    ours = builtin.overlong_penalty([""] * len(ids), [""] * len(ids), max_length=max_length,
                                    soft_buffer=soft_buffer, completion_ids=ids)
    assert ours == pytest.approx(trl, abs=1e-12)


def test_overlong_penalty_loads_with_kwargs_and_rejects_a_bad_buffer():
    reward = load_reward({"spec": "reward_models.builtin:overlong_penalty",
                          "kwargs": {"max_length": 4, "soft_buffer": 1}})
    assert reward([""], [""], completion_ids=[[1, 2, 3, 4]]) == [-1.0]
    bad = load_reward({"spec": "reward_models.builtin:overlong_penalty",
                       "kwargs": {"max_length": 4, "soft_buffer": 5}})
    with pytest.raises(RewardError, match="soft_buffer"):
        bad([""], [""], completion_ids=[[1]])

"""pass@k against hand-computed values and against its definition: the chance that k of the n
samples, drawn without replacement, hold at least one correct one."""

from __future__ import annotations

from itertools import combinations

import pytest

from align.pass_at_k import pass_at_k, pass_at_k_table, reported_ks


def test_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the share correct
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 3) == pytest.approx(1 - 35 / 120)  # 1 - C(7,3)/C(10,3)
    assert pass_at_k(4, 1, 3) == pytest.approx(1 - 1 / 4)  # 1 - C(3,3)/C(4,3)
    assert pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 hold one of the 2
    assert pass_at_k(5, 0, 5) == 0.0
    for n, c, k in [(3, 1, 0), (3, 1, 4), (3, 4, 1), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_it_is_the_share_of_k_subsets_holding_a_correct_sample():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(
                    sum(any(s) for s in subsets) / len(subsets)), (n, c, k)


def test_the_table_averages_over_prompts():
    correct = [[True, False, False, False], [False] * 4, [True, True, False, False]]
    assert reported_ks(4) == [1, 2, 4] and reported_ks(6) == [1, 2, 4, 6]
    assert reported_ks(1) == [1]
    table = pass_at_k_table(correct)
    assert list(table) == ["pass@1", "pass@2", "pass@4"]
    assert table["pass@1"] == pytest.approx((1 / 4 + 0 + 2 / 4) / 3)
    # prompt 0: 1 - C(3,2)/C(4,2) = 1/2; prompt 2: 1 - C(2,2)/C(4,2) = 5/6
    assert table["pass@2"] == pytest.approx((1 / 2 + 0 + 5 / 6) / 3)
    assert table["pass@4"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        pass_at_k_table([[True], [True, False]])

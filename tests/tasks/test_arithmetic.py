"""The embedded arithmetic task: deterministic, held-out pairs unseen, noise as configured."""

from __future__ import annotations

import re

from align.config import TaskConfig
from align.tasks import arithmetic

PROMPT = re.compile(r"^Q: (\d+)\+(\d+)=$")


def operands(prompt: str) -> tuple[int, int]:
    a, b = PROMPT.match(prompt).groups()
    return int(a), int(b)


def test_generators_are_deterministic():
    cfg = TaskConfig(num_train=300, num_eval=50)
    assert arithmetic.sft_rows(cfg) == arithmetic.sft_rows(cfg)
    assert arithmetic.preference_rows(cfg, 20) == arithmetic.preference_rows(cfg, 20)
    assert arithmetic.sft_rows(cfg) != arithmetic.sft_rows(TaskConfig(num_train=300, seed=7))


def test_held_out_pairs_never_appear_in_training():
    cfg = TaskConfig(num_train=3000, num_eval=200)
    held = {operands(r["prompt"]) for r in arithmetic.eval_rows(cfg)}
    assert len(held) == 200
    for rows in (arithmetic.sft_rows(cfg), arithmetic.rl_rows(cfg, 500),
                 arithmetic.preference_rows(cfg, 500)):
        assert not held & {operands(r["prompt"]) for r in rows}


def test_noise_drops_the_carry_at_the_configured_rate():
    cfg = TaskConfig(num_train=20000, carry_drop_prob=0.65)
    dropped = carrying = 0
    for row in arithmetic.sft_rows(cfg):
        a, b = operands(row["prompt"])
        answer = int(row["completion"])
        if arithmetic.carries(a, b):
            carrying += 1
            dropped += answer == a + b - 10
        else:
            assert answer == a + b  # only carries are ever wrong
    assert abs(dropped / carrying - 0.65) < 0.02


def test_preference_pairs_prefer_the_true_sum():
    for row in arithmetic.preference_rows(TaskConfig(), 200):
        a, b = operands(row["prompt"])
        assert int(row["chosen"]) == a + b
        assert int(row["rejected"]) != a + b and int(row["rejected"]) >= 0


def _tens_errors(rows: list[dict]) -> tuple[int, int, int]:
    """(rejected = true - 10, rejected = true + 10, on sums without a carry: true - 10)."""
    lower = higher = lower_no_carry = 0
    for row in rows:
        a, b = operands(row["prompt"])
        delta = int(row["rejected"]) - (a + b)
        lower += delta == -10
        higher += delta == 10
        lower_no_carry += delta == -10 and not arithmetic.carries(a, b)
    return lower, higher, lower_no_carry


def test_demonstrator_pairs_reject_only_dropped_carries():
    lower, higher, lower_no_carry = _tens_errors(arithmetic.preference_rows(TaskConfig(), 2000))
    assert lower > 300 and higher == 0 and lower_no_carry == 0


def test_symmetric_pairs_reject_tens_errors_both_ways():
    rows = arithmetic.preference_rows(TaskConfig(pair_errors="symmetric"), 2000)
    lower, higher, lower_no_carry = _tens_errors(rows)
    assert 400 < lower < 600 and 400 < higher < 600 and lower_no_carry > 150
    held = arithmetic.held_out_preference_rows(TaskConfig(pair_errors="symmetric"))
    assert _tens_errors(held)[1] > 50


def test_exact_match():
    assert arithmetic.is_correct(" 81", "81")
    assert arithmetic.is_correct("81 ", "81")
    assert not arithmetic.is_correct(" 811", "81")
    assert not arithmetic.is_correct(" 8", "81")
    assert arithmetic.accuracy([" 1", " 2", "x"], ["1", "3", "x"]) == 2 / 3

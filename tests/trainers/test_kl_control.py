"""The adaptive KL controller against the rule of lm-human-preferences, TRL and OpenRLHF."""

from __future__ import annotations

import pytest

from align.errors import ConfigError
from align.trainers.kl_control import KLController
from tests.conftest import tiny_ppo_config


def test_adaptive_step_is_clipped_error_times_samples_over_horizon():
    # TRL / OpenRLHF AdaptiveKLController: mult = 1 + clip(kl / target - 1, -0.2, 0.2) * n / H
    kl = KLController(0.1, adaptive=True, target=0.5, horizon=10000)
    kl.update(3.0, n_samples=256)  # error 5 clipped to 0.2
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    kl.update(0.45, n_samples=500)  # error -0.1, not clipped
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 500 / 10000))


def test_paper_gain_is_samples_over_horizon():
    # Ziegler et al. 2019: beta *= 1 + K_beta * e with K_beta = 0.1: a horizon of 10 batches
    kl = KLController(1.0, adaptive=True, target=1.0, horizon=640)
    kl.update(2.0, n_samples=64)
    assert kl.coef == pytest.approx(1.02)


def test_default_horizon_is_counted_in_samples(tmp_path):
    alg = tiny_ppo_config(tmp_path, "algorithm.adaptive_kl=true").algorithm
    assert alg.kl_horizon == 10000  # TRL's and OpenRLHF's default, in samples
    kl = KLController(alg.kl_coef, alg.adaptive_kl, alg.kl_target, alg.kl_horizon)
    kl.update(10 * alg.kl_target, n_samples=256)
    assert kl.coef == pytest.approx(alg.kl_coef * 1.00512)


def test_fixed_coefficient_does_not_move():
    kl = KLController(0.05)
    kl.update(100.0, n_samples=256)
    assert kl.coef == 0.05


def test_a_horizon_below_one_iteration_of_samples_is_refused(tmp_path):
    # a horizon written in iterations (the old meaning, e.g. 100) would now adapt explosively
    with pytest.raises(ConfigError, match="algorithm.kl_horizon=10 counts samples"):
        tiny_ppo_config(tmp_path, "algorithm.adaptive_kl=true", "algorithm.kl_horizon=10")
    assert tiny_ppo_config(tmp_path, "algorithm.kl_horizon=10").algorithm.kl_horizon == 10


def test_state_round_trips_for_resume():
    kl = KLController(0.04, adaptive=True, target=0.1, horizon=100)
    for value in (0.3, 0.2, 0.01):
        kl.update(value, n_samples=16)
    again = KLController(0.04, adaptive=True, target=0.1, horizon=100)
    again.load(kl.state())
    assert again.coef == kl.coef != 0.04
    kl.update(0.5, n_samples=16)
    again.update(0.5, n_samples=16)
    assert again.coef == kl.coef

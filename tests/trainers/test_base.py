"""The shared driver loop's guard: a non-finite loss, value loss, gradient norm or reward stops
the run before a checkpoint is written."""

from __future__ import annotations

import pytest

from align.errors import TrainingError
from align.trainers.base import _check_finite


@pytest.mark.parametrize("key", ["loss", "policy_loss", "value_loss", "grad_norm", "reward"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_training_metric_stops_the_run(key, value):
    with pytest.raises(TrainingError, match=rf"step 3: {key} is"):
        _check_finite({"entropy": 0.5, key: value}, step=3)


def test_finite_metrics_and_other_keys_pass():
    _check_finite({"loss": 1.0, "grad_norm": 0.0, "clip_ratio": float("nan")}, step=1)

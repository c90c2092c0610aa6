"""The log-prob gap between engine and trainer, and the error that stops a run on it."""

from __future__ import annotations

import pytest
import torch

from align.errors import TrainingError
from align.rollout.verify import check_logprob_gap, logprob_gap, max_logprob_diff, shifted_logprobs


def test_shifted_layout_puts_token_j_after_its_prompt():
    out = shifted_logprobs([3, 2], [[-1.0, -2.0], [-3.0]], width=6)
    assert out.shape == (2, 5)
    assert out[0].tolist() == [0.0, 0.0, -1.0, -2.0, 0.0]
    assert out[1].tolist() == [0.0, -3.0, 0.0, 0.0, 0.0]


def test_gap_is_the_masked_mean_and_max():
    engine = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 9.0, 0.0]])
    trainer = torch.tensor([[5.0, -1.5, -2.0], [-0.25, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    gap = logprob_gap(engine, trainer, mask)
    assert gap["rollout/logprob_diff_mean"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert gap["rollout/logprob_diff_max"] == pytest.approx(0.5)


def test_a_gap_over_the_limit_stops_with_causes_named():
    gap = {"rollout/logprob_diff_mean": 0.5, "rollout/logprob_diff_max": 3.0}
    with pytest.raises(TrainingError, match="iteration 1.*vllm.*0.5.*weight sync"):
        check_logprob_gap(gap, 0.01, "vllm", 1)
    check_logprob_gap({**gap, "rollout/logprob_diff_mean": 0.01}, 0.01, "vllm", 1)


def test_default_limit_depends_on_dtype():
    assert max_logprob_diff(None, "auto", on_gpu=False) == 0.01
    assert max_logprob_diff(None, "auto", on_gpu=True) == 0.1
    assert max_logprob_diff(0.3, "float32", on_gpu=False) == 0.3

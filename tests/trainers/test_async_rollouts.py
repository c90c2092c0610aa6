"""RolloutPipeline: what is submitted when, the staleness bound, waiting and overlap, and the
rollouts a checkpoint carries (against an engine that records its calls)."""

from __future__ import annotations

import json

import pytest

from align.errors import TrainingError
from align.rollout import Generation, Sampling
from align.trainers.async_rollouts import RolloutPipeline, overlap_seconds


class RecordingEngine:
    """submit/collect on a fake clock: request `i` generates over [10 i, 10 i + 4]."""

    def __init__(self) -> None:
        self.submitted: list[int] = []
        self.collected: list[int] = []

    def submit(self, prompts, sampling):
        self.submitted.append(sampling.seed)
        return sampling.seed

    def collect(self, handle, timeout_s=None):
        self.collected.append(handle)
        return Generation([[handle, 1]], [[-0.5, -0.25]], (10.0 * handle, 10.0 * handle + 4))


def request(step):
    return [[7, 8]], Sampling(max_new_tokens=2, seed=step)


def test_overlap_of_intervals():
    assert overlap_seconds((0.0, 4.0), (3.0, 10.0)) == 1.0
    assert overlap_seconds((0.0, 4.0), (5.0, 10.0)) == 0.0
    assert overlap_seconds((2.0, 3.0), (0.0, 10.0)) == 1.0
    assert overlap_seconds(None, (0.0, 1.0)) == 0.0


@pytest.mark.parametrize("depth", [1, 2])
def test_each_rollout_is_sampled_depth_versions_ahead_and_never_staler(depth):
    engine = RecordingEngine()
    pipe = RolloutPipeline(engine, depth, timeout_s=5)
    staleness = []
    for step in range(6):
        pipe.fill(step, 6, request)
        # Submitted up to `depth` iterations ahead, never past the last one.
        assert engine.submitted == list(range(min(step + depth, 5) + 1))
        generation, behind, _ = pipe.take(step)
        assert generation.tokens == [[step, 1]]
        staleness.append(behind)
        pipe.drain((0.0, 100.0))
    assert staleness == [0] + [min(s, depth) for s in range(1, 6)]


def test_drain_waits_for_what_is_in_flight_and_measures_the_overlap():
    engine = RecordingEngine()
    pipe = RolloutPipeline(engine, 1, timeout_s=5)
    pipe.fill(0, 4, request)  # steps 0 and 1
    pipe.take(0)
    # Step 1 generated over [10, 14]; the update ran over [12, 20]: 2 s at once.
    drained = pipe.drain((12.0, 20.0))
    assert drained["time/overlap"] == pytest.approx(2.0)
    assert engine.collected == [0, 1] and not pipe.in_flight
    assert pipe.take(1)[1] == 1  # already collected: served from `ready`


def test_a_rollout_past_the_bound_or_never_requested_stops_the_run():
    pipe = RolloutPipeline(RecordingEngine(), 1, timeout_s=5)
    with pytest.raises(TrainingError, match="iteration 4's rollout was never requested"):
        pipe.take(3)
    pipe.fill(0, 10, request)  # steps 0, 1 at version 0
    with pytest.raises(TrainingError, match="sampled 2 policy versions earlier"):
        pipe.in_flight[2] = pipe.in_flight.pop(1)
        pipe.take(2)


def test_checkpoint_state_round_trips_through_json():
    engine = RecordingEngine()
    pipe = RolloutPipeline(engine, 1, timeout_s=5)
    pipe.fill(0, 4, request)
    pipe.take(0)
    state = json.loads(json.dumps(pipe.state()))  # as the checkpoint stores it
    assert state == [{"step": 1, "version": 0, "tokens": [[1, 1]], "logprobs": [[-0.5, -0.25]]}]
    resumed = RolloutPipeline(RecordingEngine(), 1, timeout_s=5)
    resumed.load(state)
    resumed.fill(1, 4, request)  # step 1 is in hand; only step 2 is submitted
    assert resumed.rollout_engine.submitted == [2]
    generation, behind, _ = resumed.take(1)
    assert generation.tokens == [[1, 1]] and generation.logprobs == [[-0.5, -0.25]]
    assert behind == 1

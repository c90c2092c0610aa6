"""Asynchronous rollouts: separate engines generate the next iterations while the policy trains.

With `rollout.async_steps: k`, iteration i's rollout is submitted to the engines at the start
of iteration i - k (with the weights of policy version i - k) and taken at iteration i, so
generation of the next rollouts overlaps the current update. Versions count iterations: the
policy is at version i while iteration i trains, and no rollout is used that was sampled more
than k versions earlier. An engine runs one call at a time, so the weight sync after an update
first waits for the rollouts already queued (`drain`): their waiting is `time/wait`, and the
part of their generation that ran during the update is `time/overlap`.

For exact resume, the rollouts in flight at a checkpoint are drained and saved in it
(`state`/`load`): they were sampled with weights the checkpoint no longer holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from align.errors import TrainingError
from align.rollout import Generation, Sampling

# (prompt ids, sampling) of an iteration's first round of rollouts.
RequestFn = Callable[[int], tuple[list[list[int]], Sampling]]


def overlap_seconds(a: tuple[float, float] | None, b: tuple[float, float] | None) -> float:
    """Length of the intersection of two wall-clock intervals (0 if either is unknown)."""
    if a is None or b is None:
        return 0.0
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


class RolloutPipeline:
    """Rollouts of up to `depth` iterations ahead, in flight on a `submit`/`collect` engine.

    Args:
        rollout_engine: the rollout engine (separate vLLM engines): `submit`, `collect`; for
            multi-turn episodes an `align.episodes.submit.EpisodeSubmitter` over it, whose
            results are `EpisodeBatch`es.
        depth: `rollout.async_steps`, the staleness bound k >= 1.
        timeout_s: `rollout.timeout_s`, the longest wait for one rollout.
    """

    def __init__(self, rollout_engine: Any, depth: int, timeout_s: float) -> None:
        self.rollout_engine, self.depth, self.timeout_s = rollout_engine, depth, timeout_s
        self.in_flight: dict[int, tuple[int, Any]] = {}  # step -> (version, handle)
        self.ready: dict[int, tuple[int, Generation]] = {}  # step -> (version, generation)

    def fill(self, step: int, num_steps: int, request: RequestFn) -> None:
        """At the start of iteration `step` (policy version `step`), submit the rollouts of
        iterations step .. step + depth that are not yet requested."""
        for ahead in range(step, min(step + self.depth, num_steps - 1) + 1):
            if ahead not in self.in_flight and ahead not in self.ready:
                prompts, sampling = request(ahead)
                self.in_flight[ahead] = (step, self.rollout_engine.submit(prompts, sampling))

    def take(self, step: int) -> tuple[Generation, int, float]:
        """Iteration `step`'s rollout: (generation, staleness in versions, seconds waited)."""
        start = time.perf_counter()
        if step in self.ready:
            version, generation = self.ready.pop(step)
        elif step in self.in_flight:
            version, handle = self.in_flight.pop(step)
            generation = self.rollout_engine.collect(handle, self.timeout_s)
        else:
            raise TrainingError(f"rollout.async_steps: iteration {step + 1}'s rollout was "
                                "never requested")
        staleness = step - version
        if not 0 <= staleness <= self.depth:
            raise TrainingError(
                f"rollout.async_steps={self.depth}: iteration {step + 1} would train on a "
                f"rollout sampled {staleness} policy versions earlier")
        return generation, staleness, time.perf_counter() - start

    def drain(self, train_span: tuple[float, float]) -> dict[str, float]:
        """Wait for every rollout in flight (before a weight sync reaches the engines).

        Returns `time/wait` (seconds waited here) and `time/overlap` (seconds of their
        generation that ran inside `train_span`, the update's wall-clock interval).
        """
        start = time.perf_counter()
        overlap = 0.0
        for step in sorted(self.in_flight):
            version, handle = self.in_flight.pop(step)
            generation = self.rollout_engine.collect(handle, self.timeout_s)
            overlap += overlap_seconds(generation.span, train_span)
            self.ready[step] = (version, generation)
        return {"time/wait": time.perf_counter() - start, "time/overlap": overlap}

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> list[dict[str, Any]]:
        """The rollouts not yet trained on, as JSON (in flight ones are waited for)."""
        self.drain((0.0, 0.0))
        return [{"step": step, "version": version,
                 **({"tokens": g.tokens, "logprobs": g.logprobs} if isinstance(g, Generation)
                    else g.to_state())}
                for step, (version, g) in sorted(self.ready.items())]

    def load(self, state: list[dict[str, Any]]) -> None:
        from align.episodes.submit import EpisodeBatch

        self.in_flight.clear()
        self.ready = {item["step"]: (item["version"],
                                     EpisodeBatch.from_state(item) if "episodes" in item
                                     else Generation(item["tokens"], item["logprobs"]))
                      for item in state}

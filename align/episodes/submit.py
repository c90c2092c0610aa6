"""Episodes for the asynchronous pipeline, and the run's environment.

`EpisodeSubmitter` gives the episode runner the `submit`/`collect` pair the pipeline drives an
engine with: each submitted round is played on a background thread (its turns call the
separate engines, which serve one call at a time) and collected as an `EpisodeBatch`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from align.config import PPOConfig
from align.episodes.episode import Episode
from align.errors import TrainingError
from align.rollout.base import Sampling


@dataclass
class EpisodeBatch:
    episodes: list[Episode]
    span: tuple[float, float] | None = None  # wall-clock (start, end) of the round

    def to_state(self) -> dict[str, Any]:
        return {"episodes": [e.to_state() for e in self.episodes]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpisodeBatch:
        return cls([Episode.from_state(e) for e in state["episodes"]])


class EpisodeSubmitter:
    """Rounds of episodes played in the background, one at a time, on `engine`."""

    def __init__(self, runner: Any, engine: Any) -> None:
        self.runner, self.engine = runner, engine
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="episodes")

    def submit(self, examples: list[Any], sampling: Sampling) -> Future:
        return self.pool.submit(self._play, examples, sampling)

    def _play(self, examples: list[Any], sampling: Sampling) -> EpisodeBatch:
        start = time.time()
        episodes = self.runner.run(self.engine, examples, sampling)
        return EpisodeBatch(episodes, (start, time.time()))

    def collect(self, handle: Future, timeout_s: float) -> EpisodeBatch:
        try:
            return handle.result(timeout=timeout_s)
        except FutureTimeout:
            raise TrainingError(f"a round of episodes took longer than rollout.timeout_s="
                                f"{timeout_s:g} s") from None


def environment_spec(cfg: PPOConfig) -> Any | None:
    """The run's loaded environment (align.episodes.environment), or None without one."""
    if not cfg.environment.enabled:
        return None
    from align.episodes.environment import load_environment

    return load_environment(cfg.environment)

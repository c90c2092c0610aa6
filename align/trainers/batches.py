"""Which examples each optimizer step sees, and how they are split over workers.

The schedule is a pure function of (step, seed), so a resumed run sees exactly the batches an
uninterrupted one would, and any split of the global batch over workers and micro-batches
covers the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from align.config import TrainerConfig
from align.errors import ConfigError

T = TypeVar("T")


class StepSchedule:
    """Global-batch indices per step: a fresh seeded permutation each epoch, last partial
    batch dropped. `order_fn(epoch)` may supply the epoch's order (e.g. length-grouped), or
    None for the default."""

    def __init__(self, num_examples: int, global_batch_size: int, seed: int,
                 order_fn: Callable[[int], list[int] | None] | None = None) -> None:
        if num_examples < global_batch_size:
            raise ConfigError(f"trainer.global_batch_size={global_batch_size} is larger than "
                              f"the training set ({num_examples} examples)")
        self.num_examples, self.batch, self.seed = num_examples, global_batch_size, seed
        self.steps_per_epoch = num_examples // global_batch_size
        self._order_fn = order_fn
        self._cache: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            order = self._order_fn(epoch) if self._order_fn is not None else None
            if order is None:
                order = np.random.default_rng([self.seed, epoch]).permutation(
                    self.num_examples).tolist()
            self._cache = (epoch, order)
        return self._cache[1]

    def indices(self, step: int) -> list[int]:
        """Example indices of 0-based optimizer step `step`."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.batch
        return self.epoch_order(epoch)[start: start + self.batch]


def total_steps(trainer: TrainerConfig, num_examples: int) -> int:
    """trainer.max_steps, or the steps `trainer.epochs` passes over the data take."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    per_epoch = num_examples // trainer.global_batch_size
    return max(1, math.floor(per_epoch * trainer.epochs))


def shard(items: Sequence[T], world_size: int, micro_batch_size: int) -> list[list[list[T]]]:
    """Split one global batch into `world_size` ranks x micro-batches of `micro_batch_size`."""
    per_rank = len(items) // world_size
    ranks = [items[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]
    return [[list(rank[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
            for rank in ranks]


def shard_evenly(items: Sequence[T], world_size: int, chunk: int) -> list[list[list[T]]]:
    """Split `items` over ranks into the same number of non-empty chunks per rank (at most
    `chunk` long), as ZeRO-3 needs: every rank must run the same number of forward passes."""
    if len(items) < world_size:
        raise ValueError(f"{len(items)} items cannot be split over {world_size} workers")
    per_rank_chunks = max(1, math.ceil(len(items) / (world_size * chunk)))
    parts = np.array_split(np.arange(len(items)), world_size * per_rank_chunks)
    chunks = [[items[i] for i in part] for part in parts]
    return [chunks[r * per_rank_chunks:(r + 1) * per_rank_chunks] for r in range(world_size)]

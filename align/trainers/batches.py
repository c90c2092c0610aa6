"""Which examples each optimizer step sees, and how they are split over workers.

The schedule is a pure function of (step, seed), so a resumed run sees exactly the batches an
uninterrupted one would, and any split of the global batch over workers and micro-batches
covers the same examples.

Micro-batches hold a fixed number of items (`trainer.micro_batch_size`), or with a
`TokenBudget` (`trainer.max_tokens_per_micro_batch`) as many as fit in a number of tokens, as
veRL's dynamic batch size: a batch of mixed lengths then neither pads short samples to its
longest nor runs out of memory on it. Every rank gets the same number of micro-batches either
way (ZeRO-2 and 3 reduce and gather collectively on every backward and forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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


@dataclass(frozen=True)
class TokenBudget:
    """Micro-batches of at most `max_tokens` tokens, counted as a padded micro-batch holds
    them: its sequences x its longest (a packed one holds no more). An item longer than the
    budget runs alone."""

    max_tokens: int
    size_of: Callable[[Any], tuple[int, int]]  # item -> (its sequences, its longest's tokens)


MicroBatching = int | TokenBudget  # items per micro-batch, or a token budget


def micro_batching(trainer: TrainerConfig,
                   size_of: Callable[[Any], tuple[int, int]]) -> MicroBatching:
    """`trainer.micro_batch_size`, or with `trainer.max_tokens_per_micro_batch` its token
    budget over items whose (sequences, longest's tokens) `size_of` gives."""
    if trainer.max_tokens_per_micro_batch > 0:
        return TokenBudget(trainer.max_tokens_per_micro_batch, size_of)
    return trainer.micro_batch_size


def shard(items: Sequence[T], world_size: int, micro: MicroBatching) -> list[list[list[T]]]:
    """Split one global batch into `world_size` ranks x micro-batches of `micro` items (or
    within a token budget: `shard_by_tokens`)."""
    if isinstance(micro, TokenBudget):
        return shard_by_tokens(items, world_size, micro)
    micro_batch_size = micro
    per_rank = len(items) // world_size
    ranks = [items[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]
    return [[list(rank[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
            for rank in ranks]


def shard_evenly(items: Sequence[T], world_size: int,
                 chunk: MicroBatching) -> list[list[list[T]]]:
    """Split `items` over ranks into the same number of non-empty chunks per rank (at most
    `chunk` long, or within a token budget), as ZeRO-3 needs: every rank must run the same
    number of forward passes."""
    if len(items) < world_size:
        raise ValueError(f"{len(items)} items cannot be split over {world_size} workers")
    if isinstance(chunk, TokenBudget):
        return shard_by_tokens(items, world_size, chunk)
    per_rank_chunks = max(1, math.ceil(len(items) / (world_size * chunk)))
    parts = np.array_split(np.arange(len(items)), world_size * per_rank_chunks)
    chunks = [[items[i] for i in part] for part in parts]
    return [chunks[r * per_rank_chunks:(r + 1) * per_rank_chunks] for r in range(world_size)]


def shard_by_tokens(items: Sequence[T], world_size: int,
                    budget: TokenBudget) -> list[list[list[T]]]:
    """Split `items` over ranks, then each rank's share into micro-batches within `budget`,
    the same number on every rank.

    Items are dealt to ranks longest first, back and forth (0, 1, ..., 1, 0, ...), so ranks
    get alike lengths and as many items each as the split allows. Each rank fills
    micro-batches longest first while sequences x longest fits; a rank that needs fewer than
    the most any rank needs halves its largest micro-batches until it has as many (a rank
    with fewer items than that merges its smallest instead: inference splits may differ by one
    item per rank).
    """
    if len(items) < world_size:
        raise ValueError(f"{len(items)} items cannot be split over {world_size} workers")
    sizes = [budget.size_of(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -sizes[i][1])
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for place, i in enumerate(order):
        turn, offset = divmod(place, world_size)
        ranks[offset if turn % 2 == 0 else world_size - 1 - offset].append(i)
    groups = [_fill(rank, sizes, budget.max_tokens) for rank in ranks]
    count = min(max(map(len, groups)), min(map(len, ranks)))
    balanced = [_to_count(g, sizes, count) for g in groups]
    return [[[items[i] for i in group] for group in rank] for rank in balanced]


def _cost(group: list[int], sizes: list[tuple[int, int]]) -> int:
    """Tokens of a padded micro-batch of `group`: its sequences x its longest."""
    return sum(sizes[i][0] for i in group) * max(sizes[i][1] for i in group)


def _fill(indices: list[int], sizes: list[tuple[int, int]], max_tokens: int) -> list[list[int]]:
    """Micro-batches of `indices` (longest first) within `max_tokens`, filled in order."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and _cost(groups[-1] + [i], sizes) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _to_count(groups: list[list[int]], sizes: list[tuple[int, int]],
              count: int) -> list[list[int]]:
    """`groups` made exactly `count` micro-batches: the costliest split in two, or the two
    cheapest merged."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        largest = max((g for g in groups if len(g) > 1), key=lambda g: _cost(g, sizes))
        groups.remove(largest)
        half = len(largest) // 2
        groups += [largest[:half], largest[half:]]
    while len(groups) > count:
        groups.sort(key=lambda g: _cost(g, sizes))
        groups = [groups[0] + groups[1]] + groups[2:]
    return groups

"""Driver side of every step: shard items over a role's ranks, collate, call, combine.

Trainers build micro-batches and call their workers only through these functions, so the
rules live in one place: a training step gives each rank exactly its accumulation steps of
micro-batches (`shard`); evaluation and inference split items evenly so every rank runs the
same number of forward passes (ZeRO-3 gathers collectively; `shard_evenly`); metrics combine
by `align.metrics.combine_metric`. A micro-batch holds a number of items or, with a
`TokenBudget`, as many as fit in a number of tokens (`align.trainers.batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from align.distributed import WorkerGroup
from align.metrics import combine_metrics
from align.trainers.batches import MicroBatching, shard, shard_evenly

T = TypeVar("T")
Batch = dict[str, Any]


@dataclass
class StepResult:
    """What the ranks of one call return, combined."""

    sums: dict[str, float]  # additive metric contributions of every micro-batch and rank
    shared: dict[str, float] = field(default_factory=dict)  # same on every rank: grad_norm, lr


def collated_shards(items: Sequence[T], group: WorkerGroup, micro: MicroBatching,
                    collate: Callable[[list[T]], Batch], evenly: bool = False
                    ) -> list[list[Batch]]:
    """Per rank, its collated micro-batches of `items` (`evenly`: for evaluation/inference)."""
    split = shard_evenly if evenly else shard
    return [[collate(list(mb)) for mb in rank] for rank in split(items, group.size, micro)]


def call_objective(group: WorkerGroup, method: str, objective: Callable[..., Any],
                   batches: list[list[Batch]], **kwargs: Any) -> StepResult:
    """`method` ("train_step" or "evaluate") of `objective` on every rank's batches."""
    results = group.call_each(method, [(objective, b) for b in batches], **kwargs)
    if method == "train_step":
        return StepResult(combine_metrics(r["sums"] for r in results), results[0]["shared"])
    return StepResult(combine_metrics(results))


def train_objective(group: WorkerGroup, objective: Callable[..., Any], items: Sequence[T],
                    collate: Callable[[list[T]], Batch], micro: MicroBatching,
                    **kwargs: Any) -> StepResult:
    """One optimizer step of `objective` over the global batch `items`."""
    batches = collated_shards(items, group, micro, collate)
    return call_objective(group, "train_step", objective, batches, **kwargs)


def can_split(group: WorkerGroup, num_items: int) -> bool:
    """Whether `num_items` give every rank at least one (evaluation needs it)."""
    return num_items >= group.size


def evaluate_objective(group: WorkerGroup, objective: Callable[..., Any], items: Sequence[T],
                       collate: Callable[[list[T]], Batch], micro: MicroBatching,
                       **kwargs: Any) -> dict[str, float]:
    """Summed metrics of `objective` over `items` without gradients; {} when there are
    fewer items than ranks."""
    if not can_split(group, len(items)):
        return {}
    batches = collated_shards(items, group, micro, collate, evenly=True)
    return call_objective(group, "evaluate", objective, batches, **kwargs).sums


def call_infer(group: WorkerGroup, fn: Callable[..., Any], batches: list[list[Batch]],
               **kwargs: Any) -> list[list[Any]]:
    """`fn(model, batch)` without gradients on every rank's batches; results per batch."""
    return group.call_each("infer", [(fn, b) for b in batches], **kwargs)


def infer_in_chunks(group: WorkerGroup, fn: Callable[..., Any], num_items: int,
                    collate: Callable[[list[int]], Batch], micro: MicroBatching,
                    **kwargs: Any) -> Iterator[tuple[list[int], Any]]:
    """`fn` over items 0..num_items-1, split evenly over the ranks: yields (the indices of a
    micro-batch, fn's result on it), so callers scatter results back in item order."""
    index_shards = shard_evenly(list(range(num_items)), group.size, micro)
    batches = [[collate(chunk) for chunk in rank] for rank in index_shards]
    for rank, outputs in zip(index_shards, call_infer(group, fn, batches, **kwargs)):
        yield from zip(rank, outputs)

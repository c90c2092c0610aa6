"""Micro-batches by token budget (`trainer.max_tokens_per_micro_batch`): every item once, each
micro-batch within the budget (counted as padded: sequences x longest), the same number on
every rank; a rollout's rows are cut to their longest; bad values stop at start-up."""

from __future__ import annotations

import random

import pytest
import torch

from align.config import SFTConfig, TrainerConfig, load_config
from align.data import PreferenceExample, TokenizedExample, UnpairedExample, example_size
from align.errors import ConfigError
from align.trainers.batches import (
    TokenBudget,
    micro_batching,
    shard,
    shard_by_tokens,
    shard_evenly,
)
from align.trainers.rollout import Rollout, pad_sequences


def lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([8, 12, 30, 64, 200]) + rng.randrange(8) for _ in range(n)]


def cost(group: list[int], sizes: dict[int, tuple[int, int]]) -> int:
    return sum(sizes[i][0] for i in group) * max(sizes[i][1] for i in group)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_micro_batches_fit_the_budget_cover_every_item_and_match_across_ranks(
        seed, world_size, rows):
    items = list(range(24))
    sizes = {i: (rows, n) for i, n in enumerate(lengths(24, seed))}
    budget = TokenBudget(rows * 256, sizes.__getitem__)
    ranks = shard_by_tokens(items, world_size, budget)
    assert len(ranks) == world_size
    assert sorted(i for rank in ranks for mb in rank for i in mb) == items
    assert len({len(rank) for rank in ranks}) == 1  # ZeRO-3: the same forwards everywhere
    assert {sum(map(len, rank)) for rank in ranks} == {24 // world_size}
    for rank in ranks:
        for mb in rank:
            assert mb and cost(mb, sizes) <= budget.max_tokens
    # Padding is what a token budget saves: far less than micro-batches of 4 in item order.
    fixed = [mb for rank in shard(items, world_size, 4) for mb in rank]
    padded = sum(cost(mb, sizes) for rank in ranks for mb in rank)
    assert padded < sum(cost(mb, sizes) for mb in fixed)


def test_a_rank_that_needs_fewer_splits_its_largest_to_match():
    # Rank 0 gets the long items (one per micro-batch), rank 1 the short ones (would fit in one).
    sizes = {0: (1, 100), 1: (1, 10), 2: (1, 100), 3: (1, 10), 4: (1, 100), 5: (1, 10)}
    ranks = shard_by_tokens(list(range(6)), 2, TokenBudget(100, sizes.__getitem__))
    assert [len(rank) for rank in ranks] == [3, 3]
    assert all(cost(mb, sizes) <= 100 for rank in ranks for mb in rank)


def test_an_item_over_the_budget_runs_alone():
    sizes = {0: (1, 500), 1: (1, 10), 2: (1, 10), 3: (1, 10)}
    (rank,) = shard_by_tokens(list(range(4)), 1, TokenBudget(100, sizes.__getitem__))
    assert [0] in rank and sorted(map(len, rank)) == [1, 3]


def test_uneven_inference_splits_still_give_every_rank_as_many():
    """Five items over two ranks: 3 and 2. Each needs its own micro-batch, so the rank with 3
    would run 3 forwards; the other can run only 2, so 2 it is on both."""
    sizes = {i: (1, 100) for i in range(5)}
    ranks = shard_evenly(list(range(5)), 2, TokenBudget(100, sizes.__getitem__))
    assert [len(rank) for rank in ranks] == [2, 2]
    assert sorted(i for rank in ranks for mb in rank for i in mb) == list(range(5))


def test_an_example_costs_its_sequences_times_its_longest():
    assert example_size(TokenizedExample([1, 2, 3], [-100, 2, 3])) == (1, 3)
    assert example_size(PreferenceExample([1, 2], [3], [4, 5, 6])) == (2, 5)
    assert example_size(UnpairedExample([1, 2], [3, 4], True)) == (1, 4)
    assert example_size(UnpairedExample([1, 2], [3], False, [4, 5, 6])) == (2, 5)


def test_micro_batching_follows_the_config():
    assert micro_batching(TrainerConfig(micro_batch_size=8), len) == 8
    budget = micro_batching(TrainerConfig(max_tokens_per_micro_batch=512), len)
    assert isinstance(budget, TokenBudget) and budget.max_tokens == 512


@pytest.mark.parametrize("overrides, key", [
    (["trainer.max_tokens_per_micro_batch=-1"], "trainer.max_tokens_per_micro_batch"),
    (["trainer.max_tokens_per_micro_batch=512", "trainer.global_batch_size=5",
      "distributed.num_workers=2"], "distributed.num_workers"),
])
def test_bad_budgets_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(SFTConfig, None, overrides)


def test_a_budget_frees_the_batch_from_micro_batch_size():
    cfg = load_config(SFTConfig, None, ["trainer.max_tokens_per_micro_batch=512",
                                        "trainer.global_batch_size=6",
                                        "trainer.micro_batch_size=4"])
    assert cfg.trainer.max_tokens_per_micro_batch == 512


def test_rollout_rows_are_no_wider_than_their_longest():
    batch = pad_sequences([[5, 6], [7], [8, 9, 10]], [[11, 1], [12], [13, 14, 15, 16, 1]], 0)
    tensors = {"advantages": torch.randn(3), "old_logprobs": torch.randn(3, 7)}
    rollout = Rollout(["a", "b", "c"], ["x", "y", "z"], {}, batch, [2, 1, 5], [False] * 3,
                      tensors)
    assert batch["input_ids"].shape == (3, 8)
    assert rollout.size_of(2) == (1, 8)
    rows = rollout.rows([0, 1])
    assert rows["input_ids"].shape == (2, 4) and rows["old_logprobs"].shape == (2, 3)
    assert rows["advantages"].shape == (2,)
    torch.testing.assert_close(rows["old_logprobs"], tensors["old_logprobs"][:2, :3])
    assert rows["labels"].tolist() == batch["labels"][:2, :4].tolist()
    assert rollout.rows([1, 2])["input_ids"].shape == (2, 8)

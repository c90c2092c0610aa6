"""The `hf` engine shards prompts over the policy workers, every rank taking part in each call."""

from __future__ import annotations

import pytest

from align.rollout import Generation, Sampling
from align.rollout.hf import HFEngine


class EchoGroup:
    """Two ranks whose `generate` answers each prompt with its last token plus the rank."""

    size = 2

    def __init__(self) -> None:
        self.calls: list[list[list[list[int]]]] = []
        self.kwargs: list[dict] = []

    def call_each(self, method: str, args: list[tuple], **kwargs) -> list[Generation]:
        assert method == "generate"
        self.calls.append([shard for shard, _ in args])
        self.kwargs.append(kwargs)
        return [Generation([[p[-1], rank] for p in shard], [[-0.5, -0.5] for _ in shard])
                for rank, (shard, _) in enumerate(args)]


@pytest.mark.parametrize(("n", "batch"), [(1, None), (3, None), (5, 2), (4, 1)])
def test_every_rank_generates_in_every_call_and_each_prompt_is_answered_once(n, batch):
    group = EchoGroup()
    prompts = [[10 + i] for i in range(n)]
    gen = HFEngine(group, batch).generate(prompts, Sampling(max_new_tokens=2, logprobs=True))
    assert [t[0] for t in gen.tokens] == [10 + i for i in range(n)]  # in order, none padded
    assert len(gen.logprobs) == n
    assert all(len(shards) == 2 and all(shards) for shards in group.calls)


def test_the_decoding_options_reach_every_worker_call():
    group = EchoGroup()
    HFEngine(group, 1, prefix_cache_mb=3, draft_tokens=5).generate(
        [[1], [2], [3]], Sampling(max_new_tokens=2))
    assert group.kwargs == [{"prefix_cache_bytes": 3 << 20, "draft_tokens": 5}] * 2
    HFEngine(group).generate([[1]], Sampling(max_new_tokens=2))
    assert group.kwargs[-1] == {"prefix_cache_bytes": 0, "draft_tokens": 0}  # off unless asked


def test_no_prompts_make_no_call():
    group = EchoGroup()
    gen = HFEngine(group).generate([], Sampling(max_new_tokens=2, logprobs=True))
    assert gen.tokens == [] and gen.logprobs == [] and not group.calls

"""The `hf` rollout engine: the policy workers generate with Hugging Face `generate`.

Each worker samples its shard with its current weights (under ZeRO-3 gathered for the call),
so there is nothing to sync and nothing to put to sleep.
"""

from __future__ import annotations

from align.distributed import WorkerGroup
from align.rollout.base import Generation, Sampling
from align.trainers.batches import shard_evenly


class HFEngine:
    """Generation on the policy's own workers.

    Args:
        group: the policy WorkerGroup.
        batch_size: prompts per `generate` call on one worker; None: a worker's whole shard.
        prefix_cache_mb: keys and values each worker keeps of the rows it ran, for the next
            call's prompts that extend them (an episode's next turn); 0 keeps none.
        draft_tokens: tokens guessed from earlier text that a decoding step checks (exact
            sampling: align.rollout.drafts); 0 guesses none.
    """

    name = "hf"

    def __init__(self, group: WorkerGroup, batch_size: int | None = None,
                 prefix_cache_mb: int = 0, draft_tokens: int = 0) -> None:
        self.group, self.batch_size = group, batch_size
        self.options = {"prefix_cache_bytes": prefix_cache_mb << 20,
                        "draft_tokens": draft_tokens}

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Generation:
        size = self.group.size
        if not prompts:
            return Generation([], [] if sampling.logprobs else None)
        # Fewer prompts than ranks (the last episodes of a turn): the idle ranks repeat the
        # last prompt, since every rank must take part, and their samples are dropped.
        padded = len(prompts) + max(0, size - len(prompts))
        per_rank = shard_evenly(list(range(padded)), size,
                                self.batch_size or -(-padded // size))
        tokens: dict[int, list[int]] = {}
        logprobs: dict[int, list[float]] = {}
        # Every rank runs the same number of calls (ZeRO-3 gathers weights collectively).
        for chunk in range(len(per_rank[0])):
            shards = [[prompts[min(i, len(prompts) - 1)] for i in rank[chunk]]
                      for rank in per_rank]
            seed = None if sampling.seed is None else sampling.seed + 7919 * chunk
            call = Sampling(**{**sampling.to_dict(), "seed": seed})
            results = self.group.call_each("generate", [(s, call) for s in shards],
                                           **self.options)
            for rank, result in zip(per_rank, results):
                tokens.update(zip(rank[chunk], result.tokens))
                if result.logprobs is not None:
                    logprobs.update(zip(rank[chunk], result.logprobs))
        order = range(len(prompts))  # a padded index (>= len(prompts)) is never read
        return Generation([tokens[i] for i in order],
                          [logprobs[i] for i in order] if sampling.logprobs else None)

    def update_weights(self) -> float:
        return 0.0  # the workers generate with the weights they train

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def shutdown(self) -> None:
        pass  # the policy group belongs to the trainer

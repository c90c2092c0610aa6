"""Draft tokens for the `hf` engine's decoding loop: guesses of what a row will sample next,
looked up from text the engine has seen (prompt lookup decoding, extended to earlier samples).

A rollout's turns repeat themselves: the same tool-call syntax, tool names and argument names in
every episode, phrases of the prompt copied into answers. `NgramDrafts` keeps, for every run of
`n` tokens seen (in prompts and in sampled turns), the `k` tokens that followed it most
recently; the loop feeds a row's last token with the draft that follows its last `n` tokens,
and the one forward gives the distribution at every drafted position. The loop then samples
each position in turn from the model's own distribution and keeps going while the sample equals
the drafted token (align.rollout.hf_decode): the tokens are exactly those plain decoding samples,
drafts only decide how many come out of one forward.
"""

from __future__ import annotations


class NgramDrafts:
    """What followed each `n`-token run most recently, up to `k` tokens.

    Args:
        k: draft tokens per lookup.
        n: tokens of context a lookup matches.
        max_entries: runs held; the table starts afresh past it.
    """

    def __init__(self, k: int, n: int = 3, max_entries: int = 1 << 18) -> None:
        self.k, self.n, self.max_entries = k, n, max_entries
        self.table: dict[tuple[int, ...], list[int]] = {}

    def add(self, ids: list[int]) -> None:
        """Learn the continuations in `ids` (later text overrides earlier)."""
        if len(self.table) > self.max_entries:
            self.table.clear()
        n, k = self.n, self.k
        for i in range(len(ids) - n):
            self.table[tuple(ids[i:i + n])] = ids[i + n:i + n + k]

    def draft(self, tail: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens guessed to follow `tail` (its last `n` tokens); [] if none."""
        if limit <= 0 or len(tail) < self.n:
            return []
        return self.table.get(tuple(tail[-self.n:]), [])[:limit]

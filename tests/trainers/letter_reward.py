"""A dense toy reward for learning tests: the share of a completion's characters in a-z."""

from __future__ import annotations


def lowercase_share(prompts: list[str], completions: list[str], **columns) -> list[float]:
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def ended(prompts: list[str], completions: list[str], completion_truncated: list[bool],
          **columns) -> list[float]:
    """1 for a completion that ended with EOS, 0 for one cut at the token budget."""
    return [0.0 if cut else 1.0 for cut in completion_truncated]

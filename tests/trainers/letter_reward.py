"""A dense toy reward for learning tests: the share of a completion's characters in a-z."""

from __future__ import annotations


def lowercase_share(prompts: list[str], completions: list[str], **columns) -> list[float]:
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]

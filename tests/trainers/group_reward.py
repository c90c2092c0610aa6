"""Rewards for dynamic-sampling tests: constant for some groups of samples, varied for others."""

from __future__ import annotations


def half_constant(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                  **columns) -> list[float]:
    """0 for every sample of a prompt whose first operand is even (an all-equal group); else
    the sum of the completion's token ids mod 3 (varied within a group, almost surely)."""
    return [0.0 if int(p[3:].split("+")[0]) % 2 == 0 else float(sum(ids) % 3)
            for p, ids in zip(prompts, completion_ids)]


def last_group_varied(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Each sample of a call's last prompt gets its place among them (0, 1, 2, ...), every
    other sample 0: each round of sampling keeps exactly one varied group."""
    last = len(prompts)
    while last and prompts[last - 1] == prompts[-1]:
        last -= 1
    return [0.0] * last + [float(i) for i in range(len(prompts) - last)]

"""A reward for dynamic-sampling tests: constant for half of the prompts, varied for the rest."""

from __future__ import annotations


def half_constant(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                  **columns) -> list[float]:
    """0 for every sample of a prompt whose first operand is even (an all-equal group); else
    the sum of the completion's token ids mod 3 (varied within a group, almost surely)."""
    return [0.0 if int(p[3:].split("+")[0]) % 2 == 0 else float(sum(ids) % 3)
            for p, ids in zip(prompts, completion_ids)]

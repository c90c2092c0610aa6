"""A custom reward function, kept beside the recipe that uses it (`grpo_custom_reward.py`).

Any function with TRL's reward signature works: `fn(prompts, completions, **columns)`
returning one float (or None) per sample. Dataset columns (here `answer`) arrive by name.
"""

from __future__ import annotations


def digit_credit(prompts: list[str], completions: list[str], answer: list[str],
                 **columns: object) -> list[float]:
    """1.0 for the exact answer; otherwise partial credit: the share of the answer's digits
    that are right in place (from the units up), halved, so near misses still teach."""
    scores = []
    for completion, truth in zip(completions, answer):
        guess = completion.strip().split("</s>")[0].strip()
        if guess == truth:
            scores.append(1.0)
            continue
        right = sum(g == t for g, t in zip(reversed(guess), reversed(truth)))
        scores.append(0.5 * right / len(truth))
    return scores

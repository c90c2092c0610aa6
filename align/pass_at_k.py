"""pass@k and mean@k of k samples per prompt, as `align eval -k` reports them.

pass@k is the chance that at least one of k samples of a prompt is correct, averaged over the
prompts. With n >= k samples drawn per prompt, c of them correct, the unbiased estimator of
Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", HumanEval) is

    pass@k = 1 - C(n - c, k) / C(n, k)

which for k = n is the share of prompts with at least one correct sample, and for k = 1 the
share of correct samples (c / n). mean@k is the plain mean of a reward over all n samples of
every prompt.
"""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from `n` samples of one prompt, `c` of them correct.

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def reported_ks(n: int) -> list[int]:
    """The k that a report of n samples per prompt gives pass@k for: 1, 2, 4, ... below n,
    and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i < n]
    return [*ks, n]


def pass_at_k_table(correct: list[list[bool]]) -> dict[str, float]:
    """`{"pass@1": ..., "pass@2": ..., "pass@n": ...}`: each estimate (`pass_at_k`) averaged
    over the prompts, where `correct[p]` holds whether each of prompt p's n samples is correct
    (every prompt has the same n).

    Raises:
        ValueError: no prompts, no samples, or prompts with different numbers of samples.
    """
    sizes = {len(samples) for samples in correct}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"pass@k needs the same number (>= 1) of samples for every prompt; "
                         f"got {sorted(sizes)}")
    n = sizes.pop()
    return {f"pass@{k}": sum(pass_at_k(n, sum(samples), k) for samples in correct) / len(correct)
            for k in reported_ks(n)}

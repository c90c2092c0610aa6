"""How metric contributions of micro-batches, ranks and minibatches combine: one rule.

Objectives and workers return additive contributions (sums), which the driver divides into
means. A key starting with `min_` or `max_` (e.g. `min_reward`) combines by min or max instead.
"""

from __future__ import annotations

from collections.abc import Iterable


def combine_metric(key: str, total: float | None, value: float) -> float:
    """`total` combined with `value` under the rule of `key` (None: nothing yet)."""
    if total is None:
        return float(value)
    if key.startswith("min_"):
        return min(total, float(value))
    if key.startswith("max_"):
        return max(total, float(value))
    return total + float(value)


def accumulate(totals: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """Fold `metrics` into `totals` in place (and return it)."""
    for key, value in metrics.items():
        totals[key] = combine_metric(key, totals.get(key), value)
    return totals


def combine_metrics(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """All `parts` (per micro-batch, rank or minibatch) combined into one dict."""
    totals: dict[str, float] = {}
    for part in parts:
        accumulate(totals, part)
    return totals

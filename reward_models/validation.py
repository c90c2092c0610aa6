"""Checks on what a reward receives and returns: batch lengths, value types, finite numbers.

Every message names the reward (its spec as written in the config) and, for a bad value, the
0-based sample index in the batch with an excerpt of its prompt, so a person can find the row.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from align.errors import RewardError
from reward_models.protocol import RewardValues

_EXCERPT_CHARS = 60
# Largest reward magnitude accepted, for each reward and for the weighted total: advantages are
# computed in float32 (max 3.4e38), where squares of larger values (a variance) overflow.
REWARD_LIMIT = 1e15


def describe_sample(index: int, prompts: Sequence[Any]) -> str:
    """Name a sample for an error message: ``sample 3 (prompt 'Q: 23+58=')``.

    Args:
        index: 0-based position of the sample in the batch.
        prompts: The batch's prompts (used for a short excerpt when available).

    Returns:
        A short human-readable description.
    """
    if 0 <= index < len(prompts):
        text = str(prompts[index])
        if len(text) > _EXCERPT_CHARS:
            text = text[:_EXCERPT_CHARS] + "..."
        return f"sample {index} (prompt {text!r})"
    return f"sample {index}"


def check_batch(
    label: str, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, Any]
) -> None:
    """Check that prompts, completions and list-valued columns describe the same samples.

    Args:
        label: The reward spec, for the message.
        prompts: One prompt per sample.
        completions: One completion per sample.
        columns: Other dataset columns; list or tuple values must have one entry per sample.
            Other values (a trainer's extras) are passed through unchecked.

    Raises:
        RewardError: When a length differs, naming the reward and the column.
    """
    for what, value in (("prompts", prompts), ("completions", completions)):
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise RewardError(
                f"reward {label!r}: {what} must be a list, got {type(value).__name__}"
            )
    n = len(prompts)
    if len(completions) != n:
        raise RewardError(f"reward {label!r}: got {n} prompts but {len(completions)} completions")
    for key, value in columns.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise RewardError(
                f"reward {label!r}: column {key!r} has {len(value)} values for {n} samples"
            )


def check_values(label: str, values: Any, prompts: Sequence[Any]) -> RewardValues:
    """Validate a reward's output for a batch and convert it to ``list[float | None]``.

    Lists and tuples are accepted, and so are 1-D arrays and tensors (anything with
    ``tolist()``). Each entry must be a real number (bools count as 0/1) or ``None``; a
    one-element tensor entry is unwrapped with ``item()``.

    Args:
        label: The reward spec, for the message.
        values: What the reward returned.
        prompts: The batch's prompts; their count is the expected length.

    Returns:
        The values as Python floats, ``None`` kept.

    Raises:
        RewardError: On a non-list, a wrong length, a non-number, NaN or infinity, or a
            magnitude over ``REWARD_LIMIT``, naming the reward and (for a value) the sample.
    """
    n = len(prompts)
    if not isinstance(values, (list, tuple)) and hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward {label!r} returned {type(values).__name__}, expected a list of {n} "
            "numbers (or None for samples it does not apply to)"
        )
    if len(values) != n:
        raise RewardError(f"reward {label!r} returned {len(values)} values for {n} samples")
    return [_check_value(label, value, index, prompts) for index, value in enumerate(values)]


def _check_value(label: str, value: Any, index: int, prompts: Sequence[Any]) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):
            pass  # a multi-element array: reported as a non-number just below
    if not isinstance(value, numbers.Real):
        shown = repr(value)
        if len(shown) > _EXCERPT_CHARS:
            shown = shown[:_EXCERPT_CHARS] + "..."
        raise RewardError(
            f"reward {label!r} returned {type(value).__name__} {shown} for "
            f"{describe_sample(index, prompts)}; expected a number or None"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise RewardError(
            f"reward {label!r} returned {_short(value)} for {describe_sample(index, prompts)}; "
            "rewards must be finite (return None if the reward does not apply)"
        )
    if abs(number) > REWARD_LIMIT:
        raise RewardError(
            f"reward {label!r} returned {number:g} for {describe_sample(index, prompts)}; "
            f"rewards must lie within +-{REWARD_LIMIT:g} (the trainer computes in float32)"
        )
    return number


def _short(value: Any) -> str:
    shown = str(value)
    return shown if len(shown) <= _EXCERPT_CHARS else shown[:_EXCERPT_CHARS] + "..."

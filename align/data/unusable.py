"""Rows that are well formed but cannot be trained on: skipped and counted, or an error.

A *malformed* row (a missing column, a cell of the wrong type) is always an error naming its
file, row and column. A well-formed row can still be *unusable*: its prompt alone fills
`data.max_length` (nothing is left to complete or learn), or its chosen and rejected sides are
identical (the pair teaches nothing). Real sets hold a few such rows, so by default
(`data.on_unusable: skip`) each is left out of the prepared examples with its reason in the
`skipped` column, and the run reports the count per reason, as TRL drops such rows;
`data.on_unusable: error` stops at the first. A file with more than `data.max_skipped_fraction`
of its rows unusable stops the run: that many means the data or `data.max_length` is wrong,
not that a few rows are odd.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from align.errors import DataError

PROMPT_TOO_LONG = "prompt_too_long"
IDENTICAL_PAIR = "identical_pair"
KEPT = ""  # the `skipped` value of a usable row


class UnusableRow(DataError):
    """A well-formed row that cannot be trained on; `reason` is PROMPT_TOO_LONG or
    IDENTICAL_PAIR. Raised where it is found, caught by encoders that skip such rows.
    (Every argument but the message is optional, so it pickles back from a worker process.)"""

    def __init__(self, message: str, source: str | None = None, row: int | None = None,
                 column: str | None = None, *, reason: str = "") -> None:
        super().__init__(message, source=source, row=row, column=column)
        self.reason = reason


def prompt_too_long(length: int, max_length: int, room_for: str, source: str, row: int,
                    column: str = "prompt") -> UnusableRow:
    """The error for a prompt of `length` tokens that leaves no room `room_for` (e.g. "for the
    completion") within `max_length`."""
    return UnusableRow(f"prompt of {length} tokens is longer than data.max_length={max_length} "
                       f"allows (no room is left {room_for}); shorten it or raise "
                       "data.max_length", source=source, row=row, column=column,
                       reason=PROMPT_TOO_LONG)


def skip_or_raise(err: UnusableRow, on_unusable: str) -> str:
    """The reason to record for a skipped row; raises `err` unless `on_unusable` (the value of
    `data.on_unusable`) is "skip"."""
    if on_unusable != "skip":
        raise err
    return err.reason


def count_skipped(reasons: Sequence[str] | np.ndarray) -> dict[str, int]:
    """Rows per reason among the `skipped` values of some rows (usable rows not counted)."""
    values, counts = np.unique(np.asarray(reasons, dtype=object).astype(str),
                               return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts) if v != KEPT}


def check_skipped_share(counts: dict[str, int], num_rows: int, source: str,
                        max_fraction: float, max_length: int) -> None:
    """Stop when the unusable rows of one file are more than `max_fraction` of its rows, or
    all of them.

    Raises:
        DataError: naming the file, the share skipped and each reason with its count and share.
    """
    skipped = sum(counts.values())
    if not skipped or (skipped / num_rows <= max_fraction and skipped < num_rows):
        return
    why = {PROMPT_TOO_LONG: f"a prompt of data.max_length={max_length} tokens or more",
           IDENTICAL_PAIR: "chosen identical to rejected"}
    reasons = ", ".join(f"{reason} ({why.get(reason, reason)}): {n} rows, {n / num_rows:.1%}"
                        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    raise DataError(f"{skipped} of {num_rows} rows ({skipped / num_rows:.1%}) are unusable, "
                    f"more than data.max_skipped_fraction={max_fraction} allows: {reasons}. "
                    "Fix the data, raise data.max_length, or raise data.max_skipped_fraction",
                    source=source)


def skipped_metrics(counts: dict[str, int], prefix: str = "data/skipped/") -> dict[str, int]:
    """Counts as metric names (`data/skipped/prompt_too_long`), for metrics.jsonl and
    summary.json."""
    return {f"{prefix}{reason}": n for reason, n in sorted(counts.items())}

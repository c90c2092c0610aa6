"""Packing sequences into rows of bounded length.

A packed batch holds R rows of width W (the fullest row's length): `input_ids` (R, W), each
row a run of whole sequences, then padding, and its `PackedLayout` (`align.data.layout`) under
`LAYOUT_KEY`:
  - `position_ids` (R, W), restarting at 0 for every sequence, so attention can be kept
    inside each sequence (see `align.packed_forward`);
  - `sequence_index` (R, W), which sequence each token belongs to, -1 on padding;
  - `attention`, how the model is told the boundaries: `position_ids` or `block_mask` (see
    `align.packed_forward.STRATEGIES`);
  - optionally `unpack_index`, where each sequence's tokens are (the map back to padding).
Every padding token has position id 0, so each is a sequence of one token of its own: nothing
real attends to it, and no position id outgrows the model's table however short the row.

Sequences are placed by best-fit decreasing, as TRL's packing does: longest first, each into
the row with the least room that still fits it. Rows are therefore full, and the cost of a
micro-batch grows with its number of rows, not with the square of its tokens. By default a
row is as wide as the batch's longest sequence: never wider than the padded batch, so packing
costs at most what padding does, and less the more the lengths vary (docs/performance.md).
"""

from __future__ import annotations

import bisect
import dataclasses
import sys
from typing import Any

import torch

from align.data.layout import LAYOUT_KEY, PackedLayout
from align.losses import IGNORE_INDEX

ONE_ROW = sys.maxsize  # a row length that puts a whole batch in one row


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Place items of `lengths` into bins of `capacity` by best-fit decreasing.

    Args:
        lengths: the size of each item.
        capacity: the room in a bin; an item larger than it gets a bin of its own.

    Returns:
        The item indices of each bin, in the order they were placed (bins in order of opening).
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin number), sorted by room
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[item]
        at = bisect.bisect_left(free, (size, -1))  # the tightest bin with room >= size
        if at < len(free):
            room, number = free.pop(at)
            bins[number].append(item)
            if room > size:
                bisect.insort(free, (room - size, number))
        else:
            bins.append([item])
            if capacity > size:
                bisect.insort(free, (capacity - size, len(bins) - 1))
    return bins


def pack_sequences(sequences: list[list[int]], row_length: int | None, pad_id: int,
                   attention: str, labels: list[list[int]] | None = None,
                   unpackable: bool = False) -> dict[str, Any]:
    """Pack token-id sequences into rows of at most `row_length` tokens.

    Args:
        sequences: token ids of each sequence.
        row_length: tokens per row; None: as many as the longest sequence has (then no row
            is wider than a padded batch would be); `ONE_ROW`: every sequence in one row.
        pad_id: the id that fills the end of each row.
        attention: how the model learns the boundaries (`position_ids` or `block_mask`).
        labels: per-token labels of each sequence; each sequence's first label becomes
            IGNORE_INDEX, so no loss crosses from one sequence into the next.
        unpackable: give the layout `unpack_index` (N, L), L the longest sequence: the flat
            position (row * W + column) of each sequence's tokens, -1 past its end.

    Returns:
        `input_ids` (and `labels`), each (R, W), and the `PackedLayout` under `LAYOUT_KEY`.
    """
    lengths = [len(s) for s in sequences]
    rows = best_fit_decreasing(lengths, max(lengths, default=0) if row_length is None
                               else row_length)
    width = max((sum(len(sequences[i]) for i in row) for row in rows), default=0)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    label_ids = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    where = torch.full((len(sequences), max(map(len, sequences), default=0)), -1,
                       dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i])
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(sequences[i], dtype=torch.long)
            position_ids[r, span] = torch.arange(n)
            sequence_index[r, span] = i
            if labels is not None and n > 1:
                label_ids[r, start + 1:start + n] = torch.tensor(labels[i][1:], dtype=torch.long)
            where[i, :n] = torch.arange(r * width + start, r * width + start + n)
            start += n
    batch: dict[str, Any] = {"input_ids": input_ids}
    if labels is not None:
        batch["labels"] = label_ids
    batch[LAYOUT_KEY] = PackedLayout(position_ids, sequence_index, attention,
                                     where if unpackable else None)
    return batch


def pack_padded(batch: dict[str, torch.Tensor], row_length: int | None, pad_id: int,
                attention: str) -> dict[str, Any]:
    """Repack a right-padded batch for the forward pass, keeping its other tensors as they are.

    `input_ids` and `attention_mask` (B, T) are replaced by a packed layout (see
    `pack_sequences`) whose `unpack_index` is (B, T): with it the layout returns per-token
    outputs to the padded layout the rest of the batch (labels, per-token data) is in.
    """
    packed = pack_sequences(padded_sequences(batch), row_length, pad_id, attention,
                            unpackable=True)
    return replace_padded(batch, packed)


def padded_sequences(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The token ids of each row of a right-padded batch, without its padding."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


def replace_padded(batch: dict[str, torch.Tensor], packed: dict[str, Any]) -> dict[str, Any]:
    """`batch` with its `input_ids` and `attention_mask` replaced by the `packed` layout of its
    rows; the layout's `unpack_index` widened to (B, T), the padded layout's shape."""
    layout = packed[LAYOUT_KEY]
    index = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    index[:, :layout.unpack_index.shape[1]] = layout.unpack_index
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return {**rest, **packed, LAYOUT_KEY: dataclasses.replace(layout, unpack_index=index)}

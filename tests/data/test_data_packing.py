"""Packed layouts: best-fit decreasing rows, and the maps between packed and padded layouts."""

from __future__ import annotations

import random

import torch

from align.data.layout import (
    LAYOUT_KEY,
    PackedLayout,
    batch_layout,
    block_diagonal_mask,
    last_token_positions,
    sequence_sums,
    unpack,
    unpack_shifted,
)
from align.data.packing import ONE_ROW, best_fit_decreasing, pack_padded, pack_sequences
from align.losses import IGNORE_INDEX as IGN


def test_best_fit_decreasing_takes_the_tightest_row():
    # 6 opens row 0 (room 4), 5 row 1 (room 5); 4 fits both and goes to the tighter row 0;
    # 3 goes to row 1 (room 2 left), the first 2 fills it, the second opens row 2.
    assert best_fit_decreasing([3, 6, 2, 5, 4, 2], 10) == [[1, 4], [3, 0, 2], [5]]
    assert best_fit_decreasing([3, 6, 2], ONE_ROW) == [[1, 0, 2]]
    assert best_fit_decreasing([12, 3], 10) == [[0], [1]]  # too long: a row of its own
    assert best_fit_decreasing([], 10) == []


def test_best_fit_decreasing_rows_are_full_and_bounded():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 80))]
        rows = best_fit_decreasing(lengths, 128)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        # Best-fit decreasing uses at most 11/9 OPT + 1 rows; OPT >= total / capacity.
        assert len(rows) <= 11 / 9 * (sum(lengths) / 128) + 2


def test_pack_sequences_layout():
    batch = pack_sequences([[5, 6], [7, 8, 9], [4]], row_length=4, pad_id=0,
                           attention="block_mask", labels=[[5, 6], [7, 8, 9], [4]],
                           unpackable=True)
    layout = batch[LAYOUT_KEY]
    assert isinstance(layout, PackedLayout) and layout.attention == "block_mask"
    assert batch["input_ids"].tolist() == [[7, 8, 9, 4], [5, 6, 0, 0]]
    # Padding: position 0 on every token, sequence -1, no label.
    assert layout.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    assert layout.sequence_index.tolist() == [[1, 1, 1, 2], [0, 0, -1, -1]]
    assert batch["labels"].tolist() == [[IGN, 8, 9, IGN], [IGN, 6, IGN, IGN]]
    assert layout.unpack_index.tolist() == [[4, 5, -1], [0, 1, 2], [3, -1, -1]]
    # Each sequence's last token, where a reward model reads its score (flat positions).
    assert layout.last_positions(batch, torch.device("cpu")).tolist() == [5, 2, 3]


def test_pack_padded_round_trips_through_unpack():
    padded = {"input_ids": torch.tensor([[3, 4, 5, 0], [6, 0, 0, 0], [7, 8, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]),
              "labels": torch.tensor([[IGN, IGN, 5, IGN], [IGN] * 4, [IGN, 8, IGN, IGN]])}
    packed = pack_padded(padded, row_length=3, pad_id=0, attention="position_ids")
    assert "attention_mask" not in packed and packed["labels"] is padded["labels"]
    assert packed["input_ids"].shape == (2, 3)
    index = packed[LAYOUT_KEY].unpack_index
    back = unpack(packed["input_ids"], index)
    assert back.tolist() == (padded["input_ids"] * padded["attention_mask"]).tolist()
    # Next-token values: position t of a row holds what concerns its token t + 1.
    shifted = unpack_shifted(packed["input_ids"][:, 1:], index)
    # (A sequence's last token is followed by the next sequence's first, 6 here; the labels
    # mask that position, as they mask padding in the padded layout.)
    assert shifted.tolist() == [[4, 5, 0], [0, 0, 0], [8, 6, 0]]
    hidden = torch.arange(12.0).reshape(2, 3, 2)  # (rows, W, H) values come back too
    assert unpack(hidden, index).shape == (3, 4, 2)
    assert batch_layout(packed).to_padded(hidden).shape == (3, 4, 2)


def test_sequence_sums_and_last_tokens():
    index = torch.tensor([[1, 1, 1, 2], [0, 0, -1, -1]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0]])
    assert sequence_sums(values, index, 3).tolist() == [11.0, 6.0, 4.0]
    # Each sequence's last token, whatever its id (an EOS that is also the pad id included).
    assert last_token_positions(index, 3).tolist() == [5, 2, 3]


def test_block_diagonal_mask():
    mask = block_diagonal_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]

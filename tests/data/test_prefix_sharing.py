"""Shared-prefix layouts, checked by hand: where each token goes, what it may attend to, and
when sharing is estimated to pay."""

from __future__ import annotations

import torch

from align.data.layout import LAYOUT_KEY, SharedPrefixLayout, last_positions, shared_prefix_mask
from align.data.prefix_sharing import (
    SharePrefix,
    common_prefix_length,
    groups_of_equal_prefix,
    pack_shared,
    share_padded,
    sharing_pays,
)
from align.trainers.rollout import pad_sequences


def test_common_prefix_leaves_each_sequence_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # equal: the last stays own
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # one is the other's prefix
    assert common_prefix_length([[1, 2, 3]]) == 0
    assert common_prefix_length([[1, 2], [3, 2]]) == 0


def test_groups_of_equal_prefix_in_order_of_first_appearance():
    assert groups_of_equal_prefix([[1], [2], [1], [3, 4], [2]]) == [[0, 2], [1, 4], [3]]


def test_pack_shared_layout_by_hand():
    sequences = [[7, 8, 9, 1], [7, 8, 4], [5, 6]]
    batch = pack_shared(sequences, [[0, 1], [2]], row_length=None, pad_id=0)
    layout = batch[LAYOUT_KEY]
    assert isinstance(layout, SharedPrefixLayout)
    # unit 0: prefix [7, 8], branch 1 [9, 1], branch 2 [4]; unit 1 (5 tokens wide row) [5, 6]
    assert batch["input_ids"].tolist() == [[7, 8, 9, 1, 4], [5, 6, 0, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert layout.unit_index.tolist() == [[0, 0, 0, 0, 0], [1, 1, -1, -1, -1]]
    assert layout.branch_index.tolist() == [[0, 0, 1, 1, 2], [1, 1, 0, 0, 0]]
    assert layout.unpack_index.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [5, 6, -1, -1]]
    assert last_positions(layout.unpack_index).tolist() == [3, 4, 6]
    assert layout.last_positions(batch, torch.device("cpu")).tolist() == [3, 4, 6]


def test_mask_by_hand():
    batch = pack_shared([[7, 8, 9, 1], [7, 8, 4]], [[0, 1]], row_length=None, pad_id=0)
    layout = batch[LAYOUT_KEY]
    allowed = shared_prefix_mask(layout.unit_index, layout.branch_index)[0, 0].int()
    assert allowed.tolist() == [[1, 0, 0, 0, 0],   # 7: itself
                                [1, 1, 0, 0, 0],   # 8: the prefix
                                [1, 1, 1, 0, 0],   # 9: prefix + own branch
                                [1, 1, 1, 1, 0],   # 1
                                [1, 1, 0, 0, 1]]   # 4: prefix + itself, not the sibling


def test_padding_sees_only_padding():
    batch = pack_shared([[1, 2, 3], [1, 2, 4], [5]], [[0, 1], [2]], row_length=None, pad_id=0)
    layout = batch[LAYOUT_KEY]
    allowed = shared_prefix_mask(layout.unit_index, layout.branch_index)[1, 0]
    assert allowed.tolist() == [[True, False, False, False],
                                [False, True, False, False],
                                [False, True, True, False],
                                [False, True, True, True]]


def test_sharing_pays_for_short_samples_of_a_long_prompt_not_for_long_samples():
    prompt = list(range(2, 12))  # 10 tokens, 8 samples of 6: 58 tokens shared, 128 apart
    short = [prompt + [20 + i] * 6 for i in range(8)]
    assert sharing_pays(short, [list(range(8))], None, hidden_size=256)
    # 8 samples of 1,000 tokens after 10: sharing saves 70 of 8,080 tokens, and one row 8,010
    # wide computes 8x the attention of 8 rows of 1,010
    long = [prompt + [20 + i] * 1000 for i in range(8)]
    assert not sharing_pays(long, [list(range(8))], None, hidden_size=8192)
    # after a 2,000-token prompt: 10,000 tokens against 24,000, which pays on a wide model
    # (its linear layers dominate) but not on a narrow one (its attention does)
    documents = [prompt * 200 + [20 + i] * 1000 for i in range(8)]
    assert sharing_pays(documents, [list(range(8))], None, hidden_size=8192)
    assert not sharing_pays(documents, [list(range(8))], None, hidden_size=256)
    assert not sharing_pays(short, [[i] for i in range(8)], None, hidden_size=256)  # no group


def test_share_padded_groups_equal_prompts_and_keeps_the_rest():
    padded = pad_sequences([[5, 6, 7], [5, 6, 7], [9, 9]], [[20, 1], [21, 22, 1], [23, 1]], 0)
    padded["advantages"] = torch.arange(3.0)
    shared = share_padded(padded, None, 0, SharePrefix(32, always=True))
    assert shared[LAYOUT_KEY].unit_index.max() == 1
    assert shared["input_ids"].tolist() == [[5, 6, 7, 20, 1, 21, 22, 1], [9, 9, 23, 1, 0, 0, 0, 0]]
    index = shared[LAYOUT_KEY].unpack_index
    assert index.shape == padded["input_ids"].shape
    assert index[1].tolist() == [0, 1, 2, 5, 6, 7]
    torch.testing.assert_close(shared["advantages"], padded["advantages"])
    assert "attention_mask" not in shared
    assert share_padded(padded, None, 0, None) is None  # not asked for
    assert share_padded(padded, None, 0, SharePrefix(32)) is not None  # pays: 3 tokens saved

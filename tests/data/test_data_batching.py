"""Padding, padding-free packing (checked against a tiny Llama), preference batches, ordering."""

from __future__ import annotations

import pytest
import torch
import transformers

from align.data import (
    PreferenceExample,
    TokenizedExample,
    collate_packed,
    collate_padded,
    collate_preference,
    collate_preference_packed,
    length_grouped_order,
    tokenize_sft,
)
from align.data.layout import LAYOUT_KEY, PackedLayout
from align.data.packing import ONE_ROW
from align.losses import IGNORE_INDEX, shift_for_next_token

IGN = IGNORE_INDEX


@pytest.fixture(scope="module")
def examples():
    rows = [
        {"prompt": "Q: 12+7=", "completion": " 19"},
        {"text": "hello world"},
        {"prompt": "Q: 3+4=", "completion": " 7"},
    ]
    tokenized, _ = tokenize_sft(rows, transformers.ByT5Tokenizer(), max_length=64)
    return tokenized


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_collate_padded():
    batch = collate_padded(
        [TokenizedExample([5, 6, 7], [IGN, 6, 7]), TokenizedExample([8], [8])], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, 6, 7], [8, IGN, IGN]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_packed_layout():
    batch = collate_packed(
        [TokenizedExample([5, 6, 7], [IGN, 6, 7]), TokenizedExample([8, 9], [8, 9])],
        row_length=ONE_ROW, pad_id=0,
    )
    assert set(batch) == {"input_ids", "labels", LAYOUT_KEY}
    layout = batch[LAYOUT_KEY]
    assert isinstance(layout, PackedLayout) and layout.attention == "position_ids"
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert layout.sequence_index.tolist() == [[0, 0, 0, 1, 1]]
    # The first label of each example is dropped: no loss crosses a sample boundary.
    assert batch["labels"].tolist() == [[IGN, 6, 7, IGN, 9]]


def test_collate_packed_bounded_rows():
    examples = [TokenizedExample([5, 6, 7], [5, 6, 7]), TokenizedExample([8, 9], [8, 9]),
                TokenizedExample([4], [4])]
    batch = collate_packed(examples, row_length=None, pad_id=0)  # rows as wide as the longest
    # Best-fit decreasing: [5 6 7] fills a row; [8 9] opens the next and [4] fits beside it.
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 4]]
    assert batch[LAYOUT_KEY].sequence_index.tolist() == [[0, 0, 0], [1, 1, 2]]
    assert batch["labels"].tolist() == [[IGN, 6, 7], [IGN, 9, IGN]]


def summed_token_loss(logits, labels):
    logits, labels = shift_for_next_token(logits, labels)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGN, reduction="sum"
    )


@torch.no_grad()
def test_packed_forward_equals_separate_forwards(model, examples):
    packed = collate_packed(examples, row_length=ONE_ROW, pad_id=0)
    logits = model(
        input_ids=packed["input_ids"], position_ids=packed[LAYOUT_KEY].position_ids,
        use_cache=False
    ).logits[0]
    start = 0
    for example in examples:
        alone = model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]
        end = start + len(example.input_ids)
        torch.testing.assert_close(logits[start:end], alone, atol=1e-5, rtol=0)
        start = end

    padded = collate_padded(examples, pad_id=0)
    padded_logits = model(
        input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
    ).logits
    packed_loss = summed_token_loss(logits[None], packed["labels"])
    padded_loss = summed_token_loss(padded_logits, padded["labels"])
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-4, rtol=1e-5)
    packed_targets = (shift_for_next_token(logits[None], packed["labels"])[1] != IGN).sum()
    padded_targets = (shift_for_next_token(padded_logits, padded["labels"])[1] != IGN).sum()
    assert packed_targets == padded_targets


def test_collate_preference_stacks_chosen_then_rejected():
    examples = [
        PreferenceExample([1, 2], [3, 1], [4, 4, 1], margin=0.5),
        PreferenceExample([5], [6, 1], [7, 1], margin=1.0),
    ]
    batch = collate_preference(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 1, 0],
        [5, 6, 1, 0, 0],
        [1, 2, 4, 4, 1],
        [5, 7, 1, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [IGN, IGN, 3, 1, IGN],
        [IGN, 6, 1, IGN, IGN],
        [IGN, IGN, 4, 4, 1],
        [IGN, 7, 1, IGN, IGN],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    assert batch["margin"].tolist() == [0.5, 1.0]
    no_margin = collate_preference([PreferenceExample([1], [2], [3], None)], pad_id=0)
    assert "margin" not in no_margin


def test_collate_preference_packed_layout():
    examples = [PreferenceExample([1, 2], [3, 1], [4, 4, 1]), PreferenceExample([], [6, 1], [7, 1])]
    batch = collate_preference_packed(examples, row_length=ONE_ROW, pad_id=0)
    # Sequences 0, 1 (chosen), 2, 3 (rejected), placed longest first: 2, 0, 1, 3. An empty
    # prompt leaves the first token unscored.
    assert batch["input_ids"].tolist() == [[1, 2, 4, 4, 1, 1, 2, 3, 1, 6, 1, 7, 1]]
    assert batch["labels"].tolist() == [
        [IGN, IGN, 4, 4, 1, IGN, IGN, 3, 1, IGN, 1, IGN, 1]
    ]
    assert batch[LAYOUT_KEY].position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch[LAYOUT_KEY].sequence_index.tolist() == [[2, 2, 2, 2, 2, 0, 0, 0, 0, 1, 1, 3,
                                                         3]]


def test_length_grouped_order():
    lengths = [(i * 37) % 101 for i in range(1003)]
    order = length_grouped_order(lengths, batch_size=8, seed=3)
    assert sorted(order) == list(range(1003))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3)
    assert order != length_grouped_order(lengths, batch_size=8, seed=4)
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert all(len(batch) == 8 for batch in batches[:-1]) and len(batches[-1]) == 3
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    # Similar lengths within a batch: the spread is far below that of a random batch.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches[:-1])
    assert spread / (len(batches) - 1) < 5
    # Batches are shuffled, not sorted by length across the whole epoch.
    firsts = [lengths[batch[0]] for batch in batches[:-1]]
    assert firsts != sorted(firsts, reverse=True)

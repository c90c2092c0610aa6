"""tokenize_unpaired (KTO rows), pairs split in two, KL completions, unpaired batches."""

from __future__ import annotations

import pytest
import torch
import transformers

from align.data import (
    UnpairedExample,
    collate_unpaired,
    tokenize_unpaired,
    with_kl_completions,
)
from align.data.layout import LAYOUT_KEY
from align.data.unpaired import encode_unpaired_rows, unpaired_examples
from align.errors import DataError
from align.losses import IGNORE_INDEX

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def decoded(tokenizer, example):
    return (tokenizer.decode(example.prompt_ids), tokenizer.decode(example.completion_ids),
            example.desirable)


def test_unpaired_string_and_message_rows(tok):
    rows = [{"prompt": "Q: 2+3=", "completion": " 5", "label": True},
            {"prompt": [{"role": "user", "content": "2+3?"}],
             "completion": [{"role": "assistant", "content": "6"}], "label": False}]
    first, second = tokenize_unpaired(rows, tok, max_length=64)
    assert decoded(tok, first) == ("Q: 2+3=", " 5</s>", True)
    assert decoded(tok, second) == ("<|user|>2+3?\n<|assistant|>", "6\n", False)


def test_pairs_split_into_a_desirable_and_an_undesirable_row(tok):
    rows = [{"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6"},
            {"chosen": "The sky is blue", "rejected": "The sky is green"}]
    examples = tokenize_unpaired(rows, tok, max_length=64)
    assert [decoded(tok, e) for e in examples] == [
        ("Q: 2+3=", " 5</s>", True), ("Q: 2+3=", " 6</s>", False),
        ("The sky is", " blue</s>", True), ("The sky is", " green</s>", False)]


@pytest.mark.parametrize(("row", "column", "message"), [
    ({"prompt": "a", "completion": " b"}, "label", "missing column"),
    ({"completion": " b", "label": True}, "prompt", "missing column"),
    ({"prompt": "a", "completion": " b", "label": "yes"}, "label", "true or false"),
    ({"prompt": "a", "completion": " b", "label": 1}, "label", "true or false"),
    ({"prompt": "a", "completion": "", "label": True}, "completion", "is empty"),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "label": True},
     "completion", "mixes strings"),
])
def test_bad_unpaired_rows_name_row_and_column(tok, row, column, message):
    with pytest.raises(DataError, match=message) as err:
        tokenize_unpaired([{"prompt": "x", "completion": " y", "label": False}, row], tok, 64,
                          source="kto.jsonl")
    text = str(err.value)
    assert "kto.jsonl" in text and "row 2" in text and column in text


def test_long_completion_is_truncated_and_a_long_prompt_refused(tok):
    (example,) = tokenize_unpaired([{"prompt": "abc", "completion": "defgh", "label": True}],
                                   tok, max_length=5)
    assert tok.decode(example.completion_ids) == "de"  # cut to fit, no EOS kept
    with pytest.raises(DataError, match="max_length"):
        tokenize_unpaired([{"prompt": "abcde", "completion": "f", "label": True}], tok, 5)


def test_identical_pairs_and_long_prompts_are_skipped_when_asked(tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "a", "rejected": "a"},
            {"prompt": "abcdefgh", "completion": "f", "label": True},
            {"prompt": "p", "completion": "c", "label": False}]
    columns = encode_unpaired_rows(rows, tok, "kto.jsonl", 1, max_length=8, on_unusable="skip")
    assert columns["skipped"] == ["", "identical_pair", "prompt_too_long", ""]
    assert [len(sides) for sides in columns["desirable"]] == [2, 0, 0, 1]
    kept = tokenize_unpaired([rows[0], rows[3]], tok, 8)
    assert [e for row in unpaired_examples(columns) for e in row] == kept
    with pytest.raises(DataError, match="kto.jsonl, row 2: chosen and rejected are identical"):
        encode_unpaired_rows(rows, tok, "kto.jsonl", 1, max_length=8)
    with pytest.raises(DataError, match="row 1, column 'label': expected true or false"):
        encode_unpaired_rows([{"prompt": "abcdefgh", "completion": "f", "label": 1}], tok,
                             "kto.jsonl", 1, max_length=8, on_unusable="skip")


def test_kl_completions_rotate_within_each_batch():
    examples = [UnpairedExample([i], [10 + i, 20 + i], i % 2 == 0) for i in range(5)]
    out = with_kl_completions(examples, batch_size=3, max_length=8)
    # batches [0, 1, 2] and [3, 4]: each row takes the previous row's completion
    assert [e.kl_completion_ids for e in out] == [[12, 22], [10, 20], [11, 21],
                                                  [14, 24], [13, 23]]
    assert [e.completion_ids for e in out] == [e.completion_ids for e in examples]
    short = with_kl_completions([UnpairedExample([1, 2], [3], True),
                                 UnpairedExample([4], [5, 6, 7], False)], 2, max_length=3)
    assert short[0].kl_completion_ids == [5]  # cut to the room left by its own prompt


@pytest.mark.parametrize("packing", [True, False])
def test_collate_unpaired_layout(packing):
    examples = [UnpairedExample([1, 2], [3, 4], True, [5]),
                UnpairedExample([6], [7], False, [3, 4])]
    attention = "position_ids" if packing else None
    # rows of 12 tokens: the four sequences (4 + 2 + 3 + 3 tokens) fit in one
    batch = collate_unpaired(examples, pad_id=0, row_length=12, attention=attention,
                             sides=("completion", "kl"))
    assert batch["desirable"].tolist() == [True, False]
    if packing:
        # best-fit decreasing places the longest first: sequences 0, 2, 3, then 1
        assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 5, 6, 3, 4, 6, 7]]
        assert batch[LAYOUT_KEY].sequence_index.tolist() == [[0, 0, 0, 0, 2, 2, 2, 3, 3, 3, 1,
                                                             1]]
        assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX,
                                             IGNORE_INDEX, 5, IGNORE_INDEX, 3, 4, IGNORE_INDEX,
                                             7]]
    else:
        assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0],
                                                [6, 3, 4, 0]]
        assert torch.equal(batch["attention_mask"].sum(-1), torch.tensor([4, 2, 3, 3]))
    own = collate_unpaired(examples, pad_id=0, row_length=12, attention=attention)
    assert own["input_ids"].numel() == (6 if packing else 8)

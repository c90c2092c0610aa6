"""RL prompt rows: encoded for the cache and read back, over-long prompts skipped or refused,
malformed rows always refused."""

from __future__ import annotations

import json

import pytest
import transformers

from align.data.prepare import CacheSettings, prepare_source, prompt_encoder
from align.data.prompts import encode_prompt_rows, prompt_examples, tokenize_prompts
from align.data.tables import ExampleTable
from align.errors import DataError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROWS = [{"prompt": "Q: 1+1=", "answer": "2", "meta": {"level": 1, "tags": ["easy"]}},
        {"prompt": [{"role": "user", "content": "Q: 2+2="}], "answer": "4"},
        {"prompt": "Q: " + "9" * 40 + "+1=", "answer": "x"},
        {"prompt": "Q: 3+3=", "answer": 6}]


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_long_prompts_are_skipped_and_the_rest_read_back_exactly(tmp_path, chat_tok):
    source = tmp_path / "rl.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    table = prepare_source(str(source), "train", {}, chat_tok, prompt_encoder(40, "skip"),
                           CacheSettings(cache_dir=str(tmp_path / "cache")), False)
    assert table["skipped"] == ["", "", "prompt_too_long", ""]
    kept = [row for i, row in enumerate(ROWS) if i != 2]
    assert list(ExampleTable(table, prompt_examples).select([0, 1, 3])) == tokenize_prompts(
        kept, chat_tok, 40)
    example = prompt_examples(table[1:2])[0]
    assert example.text == "<|user|>Q: 2+2=\n<|assistant|>"
    assert example.messages == ROWS[1]["prompt"] and example.columns == {"answer": "4"}


def test_a_long_prompt_is_an_error_unless_skipped(chat_tok):
    with pytest.raises(DataError, match="rl.jsonl, row 3, column 'prompt': prompt of 46 tokens "
                                        "is longer than data.max_length=40"):
        encode_prompt_rows(ROWS, chat_tok, "rl.jsonl", 1, max_length=40)
    columns = encode_prompt_rows(ROWS, chat_tok, "rl.jsonl", 1, max_length=40,
                                 on_unusable="skip")
    assert columns["skipped"][2] == "prompt_too_long" and columns["ids"][2] == []
    assert prompt_examples(columns)[3].columns == {"answer": 6}


@pytest.mark.parametrize(
    ("row", "expected"),
    [({"question": "Q"}, "column 'prompt': RL rows need a 'prompt' column"),
     ({"prompt": 5}, "column 'prompt': expected a string, got int"),
     ({"prompt": [{"role": "user"}]}, "column 'prompt': message 0 needs a string 'content'"),
     ({"prompt": "Q", "completion_ids": [1]}, "column 'completion_ids': column"),
     (["Q"], "row 2: expected a dict of columns, got list")],
)
def test_malformed_rows_are_errors_even_when_skipping(chat_tok, row, expected):
    with pytest.raises(DataError) as caught:
        encode_prompt_rows([{"prompt": "Q: " + "9" * 40}, row], chat_tok, "rl.jsonl", 1,
                           max_length=24, on_unusable="skip")
    assert str(caught.value).startswith("rl.jsonl, row 2")
    assert expected in str(caught.value)


def test_reward_columns_keep_the_types_they_have_in_the_file(tmp_path, chat_tok):
    """pyarrow would read 1 next to 2.5 as 1.0, and an ISO date as a timestamp: the rewards
    receive the cells as the JSON Lines file holds them."""
    rows = [{"prompt": "Q1", "answer": 1, "date": "2021-01-01"},
            {"prompt": "Q2", "answer": 2.5, "date": "2021-01-02"}]
    source = tmp_path / "rl.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = prepare_source(str(source), "train", {}, chat_tok, prompt_encoder(40),
                           CacheSettings(cache_dir=str(tmp_path / "cache")), False)
    columns = [e.columns for e in ExampleTable(table, prompt_examples)]
    assert columns == [{"answer": 1, "date": "2021-01-01"}, {"answer": 2.5, "date": "2021-01-02"}]
    assert type(columns[0]["answer"]) is int

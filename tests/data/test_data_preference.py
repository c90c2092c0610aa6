"""tokenize_preference: explicit and implicit prompts, strings and messages, margins, errors."""

from __future__ import annotations

import pytest
import transformers

from align.data import extract_prompt, tokenize_preference
from align.data.preference import encode_preference_rows, preference_examples
from align.errors import DataError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def decoded(tokenizer, example):
    return tuple(
        tokenizer.decode(ids)
        for ids in (example.prompt_ids, example.chosen_ids, example.rejected_ids)
    )


def test_string_rows_end_completions_with_eos(tok):
    rows = [{"prompt": "Q: 2+3=", "chosen": " 5", "rejected": " 6", "margin": 2}]
    (example,) = tokenize_preference(rows, tok, max_length=64)
    assert decoded(tok, example) == ("Q: 2+3=", " 5</s>", " 6</s>")
    assert example.margin == 2.0


def test_message_rows_use_the_chat_template(tok):
    rows = [{"prompt": [user("2+3?")], "chosen": [assistant("5")], "rejected": [assistant("6")]}]
    (example,) = tokenize_preference(rows, tok, max_length=64)
    assert decoded(tok, example) == ("<|user|>2+3?\n<|assistant|>", "5\n", "6\n")
    assert example.margin is None


def test_implicit_prompt_from_messages(tok):
    rows = [
        {
            "chosen": [user("sky?"), assistant("blue")],
            "rejected": [user("sky?"), assistant("green")],
        }
    ]
    (example,) = tokenize_preference(rows, tok, max_length=64)
    assert decoded(tok, example) == ("<|user|>sky?\n<|assistant|>", "blue\n", "green\n")


def test_implicit_prompt_from_strings_keeps_the_space_with_the_completion(tok):
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    (example,) = tokenize_preference(rows, tok, max_length=64)
    assert decoded(tok, example) == ("The sky is", " blue.</s>", " green.</s>")


def test_extract_prompt_matches_trl():
    from trl.data_utils import extract_prompt as trl_extract_prompt

    cases = [
        ("The sky is blue.", "The sky is green."),
        ("Q: 2+2= 4", "Q: 2+2= 5"),
        ("abc", "abcd"),
        ([user("a"), assistant("b")], [user("a"), assistant("c")]),
    ]
    for chosen, rejected in cases:
        expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (
            expected["prompt"],
            expected["chosen"],
            expected["rejected"],
        )


def test_completion_is_truncated_without_eos(tok):
    rows = [{"prompt": "abc", "chosen": "defgh", "rejected": "x"}]
    (example,) = tokenize_preference(rows, tok, max_length=6)
    assert decoded(tok, example) == ("abc", "def", "x</s>")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"prompt": "p", "chosen": "a", "rejected": "a"},
            "row 1: chosen and rejected are identical",
        ),
        ({"prompt": "p", "chosen": "a"}, "row 1, column 'rejected': missing column"),
        (
            {"prompt": "p", "chosen": 1, "rejected": "a"},
            "column 'chosen': expected a string, got int",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "a"}, "column 'chosen': is empty"),
        (
            {"prompt": [user("p")], "chosen": "a", "rejected": "b"},
            "column 'chosen': preference rows need",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"},
            "column 'margin': expected a finite number, got 'big'",
        ),
        ({"chosen": "abc", "rejected": "xyz"}, "share no beginning"),
        (
            {"prompt": "p" * 10, "chosen": "a", "rejected": "b"},
            "column 'prompt': prompt of 10 tokens is longer than data.max_length=8",
        ),
    ],
)
def test_bad_rows_name_row_and_column(tok, row, expected):
    with pytest.raises(DataError) as caught:
        tokenize_preference([row], tok, max_length=8, source="prefs.jsonl")
    assert str(caught.value).startswith("prefs.jsonl, row 1")
    assert expected in str(caught.value)


def test_identical_pairs_and_long_prompts_are_skipped_when_asked(tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
            {"prompt": "p", "chosen": "a", "rejected": "a", "margin": 2.0},
            {"prompt": "p" * 10, "chosen": "a", "rejected": "b", "margin": 3.0},
            {"chosen": "same", "rejected": "same", "margin": 4.0}]
    columns = encode_preference_rows(rows, tok, "prefs.jsonl", 1, max_length=8,
                                     on_unusable="skip")
    assert columns["skipped"] == ["", "identical_pair", "prompt_too_long", "identical_pair"]
    assert columns["margin"] == [1.0, 2.0, 3.0, 4.0]  # a skipped row keeps its margin
    assert [len(ids) for ids in columns["prompt_ids"]] == [1, 0, 0, 0]
    assert preference_examples(columns)[:1] == tokenize_preference(rows[:1], tok, 8)
    with pytest.raises(DataError, match="prefs.jsonl, row 2: chosen and rejected are identical"):
        encode_preference_rows(rows, tok, "prefs.jsonl", 1, max_length=8)


@pytest.mark.parametrize("row", [{"prompt": "p", "chosen": 1, "rejected": 1},
                                 {"prompt": "p", "chosen": "a"},
                                 {"prompt": "p" * 10, "chosen": "a", "rejected": "b",
                                  "margin": "big"}])
def test_malformed_pairs_are_errors_even_when_skipping(tok, row):
    with pytest.raises(DataError, match="prefs.jsonl, row 1, column"):
        encode_preference_rows([row], tok, "prefs.jsonl", 1, max_length=8, on_unusable="skip")


def test_margin_on_some_rows_only(tok):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    with pytest.raises(DataError, match="row 2, column 'margin': `margin` must be given"):
        tokenize_preference(rows, tok, max_length=64)


def test_messages_without_chat_template():
    rows = [{"prompt": [user("p")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    with pytest.raises(DataError, match="no chat template"):
        tokenize_preference(rows, transformers.ByT5Tokenizer(), max_length=64)

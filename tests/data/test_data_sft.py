"""tokenize_sft: ids and loss masks for each TRL row shape, truncation, and row errors."""

from __future__ import annotations

import pytest
import transformers

from align.data import TokenizedExample, tokenize_sft
from align.data.sft import encode_sft_rows, sft_examples
from align.errors import DataError
from align.losses import IGNORE_INDEX

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def trained_text(tokenizer, example: TokenizedExample) -> str:
    """Decode the tokens that carry a loss (the eos token decodes as </s>)."""
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def test_prompt_completion_masks_the_prompt(tok):
    rows = [{"prompt": "Q: 2+3=", "completion": " 5"}]
    (example,), truncated = tokenize_sft(rows, tok, max_length=64)
    assert truncated == 0
    assert example.input_ids == tok("Q: 2+3= 5")["input_ids"]  # ByT5 appends </s> = eos
    assert example.input_ids[-1] == tok.eos_token_id
    assert example.labels[:7] == [IGNORE_INDEX] * 7
    assert trained_text(tok, example) == " 5</s>"


def test_full_loss_trains_the_prompt_too(tok):
    rows = [{"prompt": "Q: 2+3=", "completion": " 5"}]
    (example,), _ = tokenize_sft(rows, tok, max_length=64, completion_only_loss=False)
    assert example.labels == example.input_ids


def test_text_rows_train_everything_and_end_with_eos(tok):
    (example,), _ = tokenize_sft([{"text": "hello"}], tok, max_length=64)
    assert example.labels == example.input_ids
    assert tok.decode(example.input_ids) == "hello</s>"


def test_messages_train_only_assistant_turns(chat_tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "and 4+4?"},
        {"role": "assistant", "content": "8"},
    ]
    (example,), _ = tokenize_sft([{"messages": messages}], chat_tok, max_length=256)
    full = chat_tok.apply_chat_template(messages, tokenize=False)
    assert chat_tok.decode(example.input_ids) == full
    # Each assistant turn: its content and the template's closing newline, nothing else.
    pieces, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            pieces.append(chat_tok.decode(current))
            current = []
    pieces.append(chat_tok.decode(current))
    assert pieces == ["5\n", "8\n"]


def test_messages_full_loss(chat_tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"messages": messages}]
    (example,), _ = tokenize_sft(rows, chat_tok, max_length=256, completion_only_loss=False)
    assert chat_tok.decode(example.labels) == "<|user|>hi\n<|assistant|>yo\n"


def test_conversational_prompt_completion(chat_tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "2+3?"}],
            "completion": [{"role": "assistant", "content": "5"}],
        }
    ]
    (example,), _ = tokenize_sft(rows, chat_tok, max_length=256)
    assert chat_tok.decode(example.input_ids) == "<|user|>2+3?\n<|assistant|>5\n"
    assert trained_text(chat_tok, example) == "5\n"


def test_long_completion_is_truncated_and_counted(tok):
    rows = [{"prompt": "abc", "completion": "defghij"}, {"prompt": "a", "completion": "b"}]
    examples, truncated = tokenize_sft(rows, tok, max_length=6)
    assert truncated == 1
    assert tok.decode(examples[0].input_ids) == "abcdef"
    assert trained_text(tok, examples[0]) == "def"
    assert tok.decode(examples[1].input_ids) == "ab</s>"


def test_prompt_reaching_max_length_is_an_error(tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "abcdef", "completion": "g"}]
    with pytest.raises(DataError) as caught:
        tokenize_sft(rows, tok, max_length=6, source="train.jsonl")
    assert str(caught.value).startswith(
        "train.jsonl, row 2, column 'prompt': prompt of 6 tokens is longer than data.max_length=6"
    )


def test_prompt_reaching_max_length_is_skipped_when_asked(chat_tok):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "abcdef", "completion": "g"},
            {"messages": [{"role": "user", "content": "abcdef"},
                          {"role": "assistant", "content": "g"}]},
            {"text": "abcdefghij"}]  # no prompt: truncated, never skipped
    columns = encode_sft_rows(rows, chat_tok, "train.jsonl", 1, max_length=6,
                              completion_only_loss=True, on_unusable="skip")
    assert columns["skipped"] == ["", "prompt_too_long", "prompt_too_long", ""]
    assert columns["input_ids"][1:3] == [[], []] and columns["length"][1:3] == [0, 0]
    examples, truncated = tokenize_sft([rows[0], rows[3]], chat_tok, max_length=6)
    assert sft_examples(columns)[::3] == examples and sum(columns["truncated"]) == truncated


@pytest.mark.parametrize("row", [{"prompt": "abcdef"}, {"prompt": "abcdef", "completion": 3},
                                 {"messages": "abcdef"}])
def test_malformed_rows_are_errors_even_when_skipping(tok, row):
    with pytest.raises(DataError, match="data.jsonl, row 2"):
        encode_sft_rows([{"text": "a"}, row], tok, "data.jsonl", 1, max_length=4,
                        completion_only_loss=True, on_unusable="skip")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "a"}, "row 1, column 'completion': missing column; SFT rows need"),
        ({"question": "a"}, "row 1: SFT rows need `prompt` and `completion`"),
        ({"prompt": "a", "completion": 3}, "column 'completion': expected a string, got int"),
        ({"prompt": "a", "completion": ""}, "column 'completion': is empty"),
        ({"text": ["a"]}, "column 'text': expected a string, got list"),
        ({"messages": "hi"}, "column 'messages': expected a list of messages, got str"),
        ({"messages": [{"role": "user"}]}, "message 0 needs a string 'content', got NoneType"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ],
)
def test_bad_rows_name_row_and_column(chat_tok, row, expected):
    with pytest.raises(DataError) as caught:
        tokenize_sft([row], chat_tok, max_length=64, source="data.jsonl")
    assert str(caught.value).startswith("data.jsonl, row 1")
    assert expected in str(caught.value)


def test_messages_without_chat_template(tok):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    with pytest.raises(DataError, match="no chat template.*`prompt`/`completion`"):
        tokenize_sft(rows, tok, max_length=64)


def test_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = transformers.ByT5Tokenizer()
    # Writes the number of messages first, so a longer conversation changes the opening text.
    tokenizer.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    with pytest.raises(DataError, match="does not render this conversation incrementally"):
        tokenize_sft(rows, tokenizer, max_length=64)

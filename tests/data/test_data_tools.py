"""SFT rows that offer tools: the `tools` column reaches the chat template, and only assistant
turns are trained (tool calls included), never tool results or the tools' schemas."""

from __future__ import annotations

import json

import pytest
from transformers import ByT5Tokenizer

from align.data import tokenize_sft
from align.data.cache import tokenizer_identity
from align.embedded_tokenizer import embedded_tokenizer
from align.errors import DataError
from align.losses import IGNORE_INDEX

SCHEMA = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "description": "first factor"},
        "b": {"type": "integer", "description": "second factor"}}, "required": ["a", "b"]}}}
CALL = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 12, "b": 34}}}
MESSAGES = [{"role": "user", "content": "What is 12 * 34?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "name": "multiply", "content": "408"},
            {"role": "assistant", "content": "408"}]
CALL_TEXT = '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer("chatml")


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The texts of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_tool_results_and_schemas_carry_no_labels_and_tool_calls_do(tok):
    (example,), _ = tokenize_sft([{"messages": MESSAGES, "tools": [SCHEMA]}], tok, 512)
    text = tok.decode(example.input_ids)
    assert '"description":"Multiply two integers."' in text  # the tools reached the template
    assert trained_runs(tok, example.input_ids, example.labels) == [
        CALL_TEXT + "<|im_end|>\n", "408<|im_end|>\n"]
    response = tok.encode("<tool_response>\n408\n</tool_response>", add_special_tokens=False)
    start = next(i for i in range(len(example.input_ids))
                 if example.input_ids[i:i + len(response)] == response)
    assert example.labels[start:start + len(response)] == [IGNORE_INDEX] * len(response)
    call_token = tok.convert_tokens_to_ids("<tool_call>")
    assert example.labels[example.input_ids.index(call_token)] == call_token


def test_tools_given_as_json_text_are_the_same_tools(tok):
    as_list = tokenize_sft([{"messages": MESSAGES, "tools": [SCHEMA]}], tok, 512)[0]
    as_text = tokenize_sft([{"messages": MESSAGES, "tools": json.dumps([SCHEMA])}], tok, 512)[0]
    without = tokenize_sft([{"messages": MESSAGES}], tok, 512)[0]
    assert as_list == as_text
    assert len(without[0].input_ids) < len(as_list[0].input_ids)


def test_conversational_prompt_completion_rows_take_tools(tok):
    row = {"prompt": MESSAGES[:1], "completion": MESSAGES[1:2], "tools": [SCHEMA]}
    (example,), _ = tokenize_sft([row], tok, 512)
    assert tok.decode(example.input_ids).startswith("<|im_start|>system\n<tools>\n")
    assert trained_runs(tok, example.input_ids, example.labels) == [CALL_TEXT + "<|im_end|>\n"]


@pytest.mark.parametrize("tools, expected", [
    ("[{not json", "tools given as text must be JSON"),
    ({"type": "function"}, "expected a list of tool schemas"),
    ([SCHEMA, "multiply"], "expected a list of tool schemas"),
])
def test_a_bad_tools_cell_names_its_row_and_column(tok, tools, expected):
    rows = [{"messages": MESSAGES, "tools": [SCHEMA]}, {"messages": MESSAGES, "tools": tools}]
    with pytest.raises(DataError, match=f"row 2.*column 'tools'.*{expected}"):
        tokenize_sft(rows, tok, 512)


def test_a_tool_call_turn_needs_no_content_but_other_turns_do(tok):
    calls_only = [MESSAGES[0], {"role": "assistant", "tool_calls": [CALL]}, *MESSAGES[2:]]
    tokenize_sft([{"messages": calls_only, "tools": [SCHEMA]}], tok, 512)
    no_content = [MESSAGES[0], {"role": "assistant"}]
    with pytest.raises(DataError, match="message 1 needs a string 'content'"):
        tokenize_sft([{"messages": no_content}], tok, 512)
    bad_calls = [MESSAGES[0], {"role": "assistant", "content": "", "tool_calls": "multiply"}]
    with pytest.raises(DataError, match="message 1 has 'tool_calls' that are not a list"):
        tokenize_sft([{"messages": bad_calls}], tok, 512)


def test_the_cache_key_sees_how_an_added_token_splits_text():
    """A slow tokenizer's added tokens decide its ids by their flags too (lstrip eats the
    spaces before a token), so prepared data is keyed by them."""
    plain, stripping = ByT5Tokenizer(), ByT5Tokenizer()
    from tokenizers import AddedToken

    plain.add_tokens([AddedToken("<tool_call>", lstrip=False)])
    stripping.add_tokens([AddedToken("<tool_call>", lstrip=True)])
    assert plain("a <tool_call>").input_ids != stripping("a <tool_call>").input_ids
    assert tokenizer_identity(plain) != tokenizer_identity(stripping)

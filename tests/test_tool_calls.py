"""Tool calls read from a model turn: Hermes / Qwen2.5 blocks, and the tokenizer's own parser
where it defines one; a call that cannot be read is an error entry, never a crash."""

from __future__ import annotations

import pytest

from align.episodes.tool_calls import ParsedTurn, ToolCall, parse_turn
from tests.chat_models import chatml_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """ChatML, EOS <|im_end|>, no response parser of its own."""
    return chatml_tokenizer("qwen2")


@pytest.fixture(scope="module")
def parsing_tokenizer():
    """The same with TRL's Qwen3 response template, so `parse_response` applies."""
    from trl.chat_template_utils import qwen3_template

    tok = chatml_tokenizer("qwen2")
    tok.response_template = qwen3_template
    return tok


def block(payload: str) -> str:
    return f"<tool_call>\n{payload}\n</tool_call>"


def test_one_call_and_the_text_around_it(tokenizer):
    text = "Let me compute. " + block('{"name": "multiply", "arguments": {"a": 3, "b": 4}}')
    parsed = parse_turn(text, tokenizer, "hermes")
    assert parsed == ParsedTurn("Let me compute.", [ToolCall("multiply", {"a": 3, "b": 4})], [])


def test_several_calls_in_one_turn_keep_their_order(tokenizer):
    text = ("first " + block('{"name": "a", "arguments": {"x": 1}}') + " then "
            + block('{"name": "b", "arguments": {}}') + "\n" + block('{"name": "c"}') + " end")
    parsed = parse_turn(text, tokenizer)
    assert [c.name for c in parsed.calls] == ["a", "b", "c"]
    assert parsed.calls[2].arguments == {}
    assert parsed.content == "first  then \n end"
    assert parsed.errors == []


def test_arguments_written_as_a_json_string(tokenizer):
    text = block('{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}')
    assert parse_turn(text, tokenizer).calls == [ToolCall("add", {"a": 1, "b": 2})]


def test_bad_json_is_an_error_and_the_other_calls_still_run(tokenizer):
    text = block('{"name": "a", "arguments": {oops}}') + block('{"name": "b", "arguments": {}}')
    parsed = parse_turn(text, tokenizer)
    assert parsed.calls == [ToolCall("b", {})]
    assert len(parsed.errors) == 1
    assert parsed.errors[0].startswith("tool call 1: not valid JSON")


@pytest.mark.parametrize("payload, needle", [
    ('{"arguments": {"a": 1}}', 'missing "name"'),
    ('{"name": "", "arguments": {}}', 'missing "name"'),
    ('["a", 1]', "expected a JSON object"),
    ('{"name": "f", "arguments": [1, 2]}', "arguments must be a JSON object"),
    ('{"name": "f", "arguments": "{not json"}', "arguments are not valid JSON"),
])
def test_calls_that_cannot_be_made_are_errors(tokenizer, payload, needle):
    parsed = parse_turn(block(payload), tokenizer)
    assert parsed.calls == []
    assert len(parsed.errors) == 1 and needle in parsed.errors[0], parsed.errors


def test_an_unterminated_block_is_an_error_and_not_content(tokenizer):
    text = "ok " + block('{"name": "a"}') + ' <tool_call>\n{"name": "b", "argu'
    parsed = parse_turn(text, tokenizer)
    assert parsed.calls == [ToolCall("a", {})]
    assert parsed.errors == ["tool call 2: <tool_call> is never closed by </tool_call>"]
    assert parsed.content == "ok"


def test_plain_text_and_a_trailing_eos(tokenizer):
    assert parse_turn("  The answer is 12.<|im_end|>", tokenizer) == ParsedTurn(
        "The answer is 12.", [], [])


def test_auto_uses_the_tokenizers_response_parser(parsing_tokenizer):
    text = "<think>need a tool</think>" + block('{"name": "f", "arguments": {"q": "x"}}')
    parsed = parse_turn(text, parsing_tokenizer, "auto")
    assert parsed == ParsedTurn("", [ToolCall("f", {"q": "x"})], [], reasoning="need a tool")
    hermes = parse_turn(text, parsing_tokenizer, "hermes")
    assert hermes.content == "<think>need a tool</think>" and hermes.reasoning == ""


def test_auto_parser_failures_are_errors(parsing_tokenizer):
    text = "hi " + block('{"name": "f", "arguments": {bad}}')
    parsed = parse_turn(text, parsing_tokenizer, "auto")
    assert parsed.calls == [] and parsed.content == "hi"
    assert len(parsed.errors) == 1 and "not valid JSON" in parsed.errors[0]


def test_auto_parser_string_arguments_and_missing_names(parsing_tokenizer):
    text = block('{"name": "g", "arguments": "{\\"b\\": 2}"}') + block('{"arguments": {}}')
    parsed = parse_turn(text, parsing_tokenizer, "auto")
    assert parsed.calls == [ToolCall("g", {"b": 2})]
    assert parsed.errors == ['tool call 2: missing "name" (the tool to call)']


def test_unknown_format_is_refused(tokenizer):
    with pytest.raises(ValueError, match="tool-call format 'xml'"):
        parse_turn("hi", tokenizer, "xml")

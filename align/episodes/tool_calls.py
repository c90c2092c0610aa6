"""Read tool calls out of the text of one model turn.

Two readers:

- ``hermes``: the Hermes / Qwen2.5 form, any number of blocks in one turn::

      <tool_call>
      {"name": "multiply", "arguments": {"a": 3, "b": 4}}
      </tool_call>

  ``arguments`` may be an object or a JSON string holding one (``parameters`` is read the
  same way); a call without arguments gets ``{}``.
- the tokenizer's own response parser (``tokenizer.parse_response`` with its
  ``response_template``, transformers >= 5.13), where the tokenizer defines one.

``fmt="auto"`` uses the tokenizer's parser where there is one, else ``hermes``. A call that
cannot be read (a block that is not JSON, never closed, or without a name) does not stop the
episode: it becomes an entry of ``ParsedTurn.errors``, a short text that goes back to the
model as the tool's answer and is counted as a tool error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)" + re.escape(_CLOSE), re.DOTALL)
FORMATS = ("auto", "hermes")


@dataclass
class ToolCall:
    """One call the model asked for: the tool's name and its keyword arguments."""

    name: str
    arguments: dict


@dataclass
class ParsedTurn:
    """A model turn read apart.

    Attributes:
        content: The text outside the tool-call blocks, stripped.
        calls: The calls that parsed, in the order written.
        errors: One short text per call that did not parse, for the model to read.
        reasoning: Reasoning the tokenizer's parser split off (``<think>...</think>``); empty
            for ``hermes``, which leaves it in ``content``.
    """

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reasoning: str = ""


def parse_turn(text: str, tokenizer: Any, fmt: str = "auto", *, prefix: str = "",
               tools: list[dict] | None = None) -> ParsedTurn:
    """Read the tool calls of one model turn.

    Args:
        text: The turn as decoded from the sampled tokens.
        tokenizer: The policy's tokenizer (its ``response_template`` and EOS token are read).
        fmt: ``auto`` (the tokenizer's parser where it has one, else ``hermes``) or ``hermes``.
        prefix: For the tokenizer's parser: the rendered prompt the turn continues, which some
            templates need (an opening ``<think>`` written by the template).
        tools: For the tokenizer's parser: the tool schemas, which type the arguments.

    Returns:
        The content, the calls that parsed and an error text for each one that did not.

    Raises:
        ValueError: For an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"tool-call format {fmt!r}: choose one of {', '.join(FORMATS)}")
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos:
        text = text.removesuffix(eos)
    if fmt == "auto" and getattr(tokenizer, "response_template", None) is not None:
        return _parse_with_template(text, tokenizer, prefix, tools)
    return parse_hermes(text)


def parse_hermes(text: str) -> ParsedTurn:
    """Read ``<tool_call>{json}</tool_call>`` blocks (Hermes / Qwen2.5) from ``text``."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    outside: list[str] = []
    position = 0
    for number, match in enumerate(_BLOCK.finditer(text), start=1):
        outside.append(text[position:match.start()])
        position = match.end()
        call = _read_call(match.group(1), number, errors)
        if call is not None:
            calls.append(call)
    rest = text[position:]
    opened = rest.find(_OPEN)
    if opened >= 0:
        errors.append(f"tool call {len(calls) + len(errors) + 1}: {_OPEN} is never closed "
                      f"by {_CLOSE}")
        rest = rest[:opened]
    outside.append(rest)
    return ParsedTurn("".join(outside).strip(), calls, errors)


def _read_call(block: str, number: int, errors: list[str]) -> ToolCall | None:
    """One block's JSON as a call; on failure an entry in ``errors`` and None."""
    try:
        payload = json.loads(block)
    except json.JSONDecodeError as err:
        errors.append(f"tool call {number}: not valid JSON ({err.msg} at character {err.pos})")
        return None
    return _as_call(payload, number, errors)


def _as_call(payload: Any, number: int, errors: list[str]) -> ToolCall | None:
    """A decoded ``{"name", "arguments"}`` object as a call; on failure an error entry."""
    if not isinstance(payload, dict):
        errors.append(f"tool call {number}: expected a JSON object with \"name\" and "
                      f"\"arguments\", got {type(payload).__name__}")
        return None
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"tool call {number}: missing \"name\" (the tool to call)")
        return None
    arguments = payload.get("arguments", payload.get("parameters"))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            errors.append(f"tool call {number} ({name}): arguments are not valid JSON "
                          f"({err.msg} at character {err.pos})")
            return None
    if not isinstance(arguments, dict):
        errors.append(f"tool call {number} ({name}): arguments must be a JSON object, got "
                      f"{type(arguments).__name__}")
        return None
    return ToolCall(name.strip(), arguments)


def _parse_with_template(text: str, tokenizer: Any, prefix: str,
                         tools: list[dict] | None) -> ParsedTurn:
    """The tokenizer's ``parse_response``; where it fails, Hermes, then the parser's error."""
    try:
        message = tokenizer.parse_response(text, prefix=prefix, tools=tools)
    except (ValueError, TypeError, KeyError) as err:
        fallback = parse_hermes(text)
        if fallback.calls or fallback.errors:
            return fallback
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return ParsedTurn(fallback.content, [], [f"the reply could not be parsed: {reason}"])
    calls: list[ToolCall] = []
    errors: list[str] = []
    for number, entry in enumerate(message.get("tool_calls") or [], start=1):
        payload = entry.get("function", entry) if isinstance(entry, dict) else entry
        call = _as_call(payload, number, errors)
        if call is not None:
            calls.append(call)
    content = message.get("content")
    reasoning = message.get("reasoning_content")
    return ParsedTurn(content.strip() if isinstance(content, str) else "", calls, errors,
                      reasoning.strip() if isinstance(reasoning, str) else "")

"""Conversations (lists of `{role, content}` messages) rendered with the tokenizer's chat template.

The template is the tokenizer's own, so a model is trained on exactly the format it is prompted
with. Which tokens belong to the assistant is found by rendering prefixes of the conversation:
for an assistant message `i`, the text of `messages[:i]` with the generation prompt is a prefix
of the text of `messages[:i + 1]`, and the difference is the assistant's turn (its content and
whatever the template emits to close the turn). This needs no `{% generation %}` markers in the
template, so it works with templates as the model authors shipped them.

A row may offer tools, as TRL's datasets do: a `tools` column holding a list of JSON schemas
(or that list as JSON text), passed to the template as `apply_chat_template(..., tools=...)`.
Assistant messages may carry structured `tool_calls` (their content then may be empty or
missing), and `tool` messages the tools' results; only assistant turns are ever trained.
"""

from __future__ import annotations

import json
from typing import Any

from align.errors import DataError

NO_TEMPLATE = (
    "the tokenizer has no chat template, so message lists cannot be rendered; use a "
    "tokenizer that has one (a chat/instruct model's) or give `prompt`/`completion` "
    "strings instead"
)

_NOT_INCREMENTAL = (
    "the chat template does not render this conversation incrementally (the text "
    "of the earlier turns changes when later turns are added), so the assistant's "
    "tokens cannot be located; use a template that renders turns in order (for "
    "SFT, completion_only_loss=false trains on the whole text instead)"
)


def is_messages(value: Any) -> bool:
    """Whether a cell looks like a conversation (a list of dicts), as opposed to a string."""
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def check_messages(value: Any, source: str, row: int, column: str) -> list[dict]:
    """Check that a cell is a non-empty list of `{role: str, content: str}` messages."""
    if not isinstance(value, list):
        raise DataError(
            f"expected a list of messages, got {type(value).__name__}",
            source=source,
            row=row,
            column=column,
        )
    if not value:
        raise DataError("the message list is empty", source=source, row=row, column=column)
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                f"message {index} is a {type(message).__name__}, expected {{role, content}}",
                source=source,
                row=row,
                column=column,
            )
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list)
                                      and all(isinstance(c, dict) for c in calls)):
            raise DataError(f"message {index} has 'tool_calls' that are not a list of "
                            f"{{type, function: {{name, arguments}}}} objects",
                            source=source, row=row, column=column)
        for key in ("role", "content"):
            if key == "content" and calls and message.get(key) is None:
                continue  # a tool-calling turn may have no text
            if not isinstance(message.get(key), str):
                raise DataError(
                    f"message {index} needs a string '{key}', got "
                    f"{type(message.get(key)).__name__}",
                    source=source,
                    row=row,
                    column=column,
                )
    return value


def check_tools(value: Any, source: str, row: int) -> list[dict] | None:
    """A row's `tools` cell: None (no tools), or a list of JSON schemas, given as such or as
    JSON text (as TRL reads it).

    Raises:
        DataError: text that is not JSON, or a value that is not a list of objects.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"tools given as text must be JSON: {err}", source=source,
                            row=row, column="tools") from None
    if not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise DataError(f"expected a list of tool schemas ({{type: function, function: {{name, "
                        f"description, parameters}}}}), got {type(value).__name__}",
                        source=source, row=row, column="tools")
    return value


def render(
    tokenizer: Any,
    messages: list[dict],
    add_generation_prompt: bool,
    source: str,
    row: int,
    column: str,
    tools: list[dict] | None = None,
) -> str:
    """Text of `messages` (offered `tools`) under the tokenizer's chat template ("" for no
    messages)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(NO_TEMPLATE, source=source, row=row, column=column)
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # templates raise on data they refuse (roles out of order, ...)
        raise DataError(
            f"the chat template failed on this conversation: {err}",
            source=source,
            row=row,
            column=column,
        ) from None


def split_completion(
    tokenizer: Any, prompt: list[dict], completion: list[dict], source: str, row: int,
    column: str, tools: list[dict] | None = None,
) -> tuple[str, str]:
    """Render a conversational prompt/completion pair into (prompt text, completion text).

    The prompt is rendered with the generation prompt; the completion text is what rendering
    prompt + completion adds after it.
    """
    prompt_text = render(tokenizer, prompt, True, source, row, column, tools)
    full_text = render(tokenizer, prompt + completion, False, source, row, column, tools)
    if not full_text.startswith(prompt_text):
        raise DataError(_NOT_INCREMENTAL, source=source, row=row, column=column)
    return prompt_text, full_text[len(prompt_text) :]


def assistant_segments(
    tokenizer: Any, messages: list[dict], source: str, row: int, column: str,
    tools: list[dict] | None = None,
) -> list[tuple[str, bool]]:
    """Cut a rendered conversation into consecutive (text, is_assistant_turn) pieces; tool
    turns, like user turns, are not assistant turns.

    The pieces joined give the text of the whole conversation.
    """
    full_text = render(tokenizer, messages, False, source, row, column, tools)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of full_text already assigned to a segment
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], True, source, row, column, tools)
        through = full_text if index == len(messages) - 1 else render(
            tokenizer, messages[: index + 1], False, source, row, column, tools)
        if not (
            len(before) >= done and through.startswith(before) and full_text.startswith(through)
        ):
            raise DataError(_NOT_INCREMENTAL, source=source, row=row, column=column)
        segments += [(full_text[done : len(before)], False), (through[len(before) :], True)]
        done = len(through)
    segments.append((full_text[done:], False))
    return [(text, trained) for text, trained in segments if text]

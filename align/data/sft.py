"""Turn SFT rows into token ids and loss labels.

Row shapes follow TRL's conventions:

- `{prompt, completion}` strings: prompt ids + completion ids + EOS; with completion-only loss
  the prompt positions get IGNORE_INDEX.
- `{prompt, completion}` message lists (conversational prompt-completion): the prompt is
  rendered with the chat template's generation prompt and the completion is what rendering
  prompt + completion adds; no EOS is appended (the template closes the turn), as in TRL.
- `{messages}`: rendered with the chat template; with completion-only loss only the assistant
  turns are trained (see `align.data.conversations` for how they are located).
- `{text}`: every token and EOS are trained.

A row longer than `max_length` is truncated from the right; a row whose prompt alone reaches
`max_length` is an error, since nothing of its completion would be left to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align.data.conversations import assistant_segments, check_messages, render, split_completion
from align.data.text import encode, eos_token_id, require_text, with_eos
from align.errors import DataError
from align.losses import IGNORE_INDEX

SHAPES = (
    "SFT rows need `prompt` and `completion` (strings or message lists), `messages` "
    "(a list of {role, content}), or `text`"
)

# A row cut into consecutive pieces of token ids, each flagged as trained (in the loss) or not.
Segments = list[tuple[list[int], bool]]


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence: `labels` is `input_ids` with IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def tokenize_sft(
    rows: list[dict],
    tokenizer: Any,
    max_length: int,
    completion_only_loss: bool = True,
    source: str = "<rows>",
) -> tuple[list[TokenizedExample], int]:
    """Tokenize SFT rows and build their loss labels.

    Args:
        rows: dicts in one of the shapes in the module docstring (shapes may mix).
        tokenizer: a Hugging Face tokenizer (with a chat template for message rows).
        max_length: the longest sequence kept; longer ones are truncated from the right.
        completion_only_loss: train only on completions / assistant turns; False trains on
            every token.
        source: where the rows came from, for error messages.

    Returns:
        The examples, one per row in order, and how many of them were truncated.

    Raises:
        DataError: a row has none of the accepted shapes, a cell has the wrong type or is
            empty, or a prompt leaves no room for its completion within `max_length`.
    """
    examples: list[TokenizedExample] = []
    truncated = 0
    for number, row in enumerate(rows, start=1):
        segments, prompt_column = _segments(row, tokenizer, completion_only_loss, source, number)
        if prompt_column is not None:
            prompt_length = _leading_untrained(segments)
            if prompt_length >= max_length:
                raise DataError(
                    f"prompt of {prompt_length} tokens is longer than "
                    f"data.max_length={max_length} allows (no room is left for the "
                    "completion); shorten it or raise data.max_length",
                    source=source,
                    row=number,
                    column=prompt_column,
                )
        input_ids, labels = _flatten(segments, completion_only_loss)
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("no tokens to train on", source=source, row=number)
        examples.append(TokenizedExample(input_ids=input_ids, labels=labels))
    return examples, truncated


def _segments(
    row: Any, tokenizer: Any, completion_only_loss: bool, source: str, number: int
) -> tuple[Segments, str | None]:
    """The row's token pieces, and the column holding its prompt (None when it has none)."""
    if not isinstance(row, dict):
        raise DataError(
            f"expected a dict of columns, got {type(row).__name__}", source=source, row=number
        )
    if "messages" in row:
        return _messages_segments(row["messages"], tokenizer, completion_only_loss, source, number)
    if "prompt" in row or "completion" in row:
        for column in ("prompt", "completion"):
            if column not in row:
                raise DataError(
                    f"missing column; {SHAPES}", source=source, row=number, column=column
                )
        return _prompt_completion_segments(
            row["prompt"], row["completion"], tokenizer, source, number
        ), "prompt"
    if "text" in row:
        text = require_text(row["text"], source, number, "text")
        return [(with_eos(encode(tokenizer, text), eos_token_id(tokenizer)), True)], None
    raise DataError(f"{SHAPES}; found columns {sorted(row)}", source=source, row=number)


def _prompt_completion_segments(
    prompt: Any, completion: Any, tokenizer: Any, source: str, number: int
) -> Segments:
    if isinstance(prompt, list):
        prompt = check_messages(prompt, source, number, "prompt")
        if not isinstance(completion, list):
            raise DataError(
                f"the prompt is a message list, so the completion must be one too; "
                f"got {type(completion).__name__}",
                source=source,
                row=number,
                column="completion",
            )
        completion = check_messages(completion, source, number, "completion")
        prompt_text, completion_text = split_completion(
            tokenizer, prompt, completion, source, number, "completion"
        )
        return [(encode(tokenizer, prompt_text), False), (encode(tokenizer, completion_text), True)]
    prompt = require_text(prompt, source, number, "prompt", allow_empty=True)
    completion = require_text(completion, source, number, "completion")
    return [
        (encode(tokenizer, prompt), False),
        (with_eos(encode(tokenizer, completion), eos_token_id(tokenizer)), True),
    ]


def _messages_segments(
    messages: Any, tokenizer: Any, completion_only_loss: bool, source: str, number: int
) -> tuple[Segments, str | None]:
    messages = check_messages(messages, source, number, "messages")
    if not completion_only_loss:
        # Full-sequence loss needs no turn boundaries: one piece, truncated if too long.
        text = render(tokenizer, messages, False, source, number, "messages")
        return [(encode(tokenizer, text), True)], None
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            "no assistant message, so nothing to train on with completion_only_loss",
            source=source,
            row=number,
            column="messages",
        )
    pieces = assistant_segments(tokenizer, messages, source, number, "messages")
    return [(encode(tokenizer, text), trained) for text, trained in pieces], "messages"


def _leading_untrained(segments: Segments) -> int:
    """Number of tokens before the first trained piece (the prompt)."""
    count = 0
    for ids, trained in segments:
        if trained:
            break
        count += len(ids)
    return count


def _flatten(segments: Segments, completion_only_loss: bool) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in segments:
        input_ids += ids
        labels += ids if trained or not completion_only_loss else [IGNORE_INDEX] * len(ids)
    return input_ids, labels

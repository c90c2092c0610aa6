"""Turn SFT rows into token ids and loss labels.

Row shapes follow TRL's conventions:

- `{prompt, completion}` strings: prompt ids + completion ids + EOS; with completion-only loss
  the prompt positions get IGNORE_INDEX.
- `{prompt, completion}` message lists (conversational prompt-completion): the prompt is
  rendered with the chat template's generation prompt and the completion is what rendering
  prompt + completion adds; no EOS is appended (the template closes the turn), as in TRL.
- `{messages}`: rendered with the chat template; with completion-only loss only the assistant
  turns are trained (see `align.data.conversations` for how they are located), never tool or
  user turns.
- Conversational rows may carry a `tools` column (a list of JSON schemas, or that list as JSON
  text), which the chat template receives as `tools=`, as in TRL.
- `{text}`: every token and EOS are trained.

A row longer than `max_length` is truncated from the right. A row whose prompt alone reaches
`max_length` leaves nothing of its completion to learn from: it is unusable
(`align.data.unusable`), skipped or an error as `data.on_unusable` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from align.data.conversations import (
    assistant_segments,
    check_messages,
    check_tools,
    render,
    split_completion,
)
from align.data.text import encode_many, eos_token_id, require_text, with_eos
from align.data.unusable import KEPT, UnusableRow, prompt_too_long, skip_or_raise
from align.errors import DataError
from align.losses import IGNORE_INDEX

SHAPES = (
    "SFT rows need `prompt` and `completion` (strings or message lists), `messages` "
    "(a list of {role, content}), or `text`"
)

# A row cut into consecutive pieces of text: (text, trained (in the loss), ends with EOS).
Piece = tuple[str, bool, bool]
# The same pieces as token ids, each flagged as trained or not.
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
    columns = encode_sft_rows(rows, tokenizer, source, 1, max_length=max_length,
                              completion_only_loss=completion_only_loss)
    return sft_examples(columns), sum(columns["truncated"])


def encode_sft_rows(rows: list[Any], tokenizer: Any, source: str, first: int, *,
                    max_length: int, completion_only_loss: bool,
                    on_unusable: str = "error") -> dict[str, list]:
    """Rows (numbered from `first` in `source`) as columns: `input_ids`, `labels`, `length`,
    whether each was `truncated`, and why it was `skipped` (KEPT when it was not: with
    `on_unusable="skip"` a row whose prompt fills `max_length` is kept as an empty row with
    its reason). Every text of the rows is encoded in one batched call.

    Raises:
        DataError: as `tokenize_sft`, for the first bad row.
    """
    plans: list[tuple[list[Piece], str | None]] = []
    failure = None
    for number, row in enumerate(rows, start=first):
        try:
            plans.append(_pieces(row, tokenizer, completion_only_loss, source, number))
        except DataError as err:  # rows before it may hold an error found only once encoded
            failure = err
            break
    ids = iter(encode_many(tokenizer, [text for pieces, _ in plans for text, _, _ in pieces]))
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": [],
                            "skipped": []}
    for number, (pieces, prompt_column) in enumerate(plans, start=first):
        segments = [(with_eos(next(ids), eos_token_id(tokenizer)) if eos else next(ids), trained)
                    for _, trained, eos in pieces]
        try:
            input_ids, labels = _checked(segments, prompt_column, max_length,
                                         completion_only_loss, source, number)
        except UnusableRow as err:
            reason = skip_or_raise(err, on_unusable)
            for name, value in (("input_ids", []), ("labels", []), ("length", 0),
                                ("truncated", False), ("skipped", reason)):
                out[name].append(value)
            continue
        out["skipped"].append(KEPT)
        out["truncated"].append(len(input_ids) > max_length)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if labels.count(IGNORE_INDEX) == len(labels):  # C speed: this runs once per row
            raise DataError("no tokens to train on", source=source, row=number)
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["length"].append(len(input_ids))
    if failure is not None:
        raise failure
    return out


def sft_examples(columns: dict[str, list]) -> list[TokenizedExample]:
    """Examples from a batch of `encode_sft_rows` columns (as read back from a table)."""
    return [TokenizedExample(ids, labels)
            for ids, labels in zip(columns["input_ids"], columns["labels"])]


def _checked(segments: Segments, prompt_column: str | None, max_length: int,
             completion_only_loss: bool, source: str, number: int
             ) -> tuple[list[int], list[int]]:
    """The row's ids and labels, untruncated, once its prompt is known to leave room."""
    if prompt_column is not None:
        prompt_length = _leading_untrained(segments)
        if prompt_length >= max_length:
            raise prompt_too_long(prompt_length, max_length, "for the completion", source,
                                  number, prompt_column)
    return _flatten(segments, completion_only_loss)


def _pieces(
    row: Any, tokenizer: Any, completion_only_loss: bool, source: str, number: int
) -> tuple[list[Piece], str | None]:
    """The row's text pieces, and the column holding its prompt (None when it has none)."""
    if not isinstance(row, dict):
        raise DataError(
            f"expected a dict of columns, got {type(row).__name__}", source=source, row=number
        )
    if "messages" in row:
        tools = check_tools(row.get("tools"), source, number)
        return _messages_pieces(row["messages"], tokenizer, completion_only_loss, source, number,
                                tools)
    if "prompt" in row or "completion" in row:
        for column in ("prompt", "completion"):
            if column not in row:
                raise DataError(
                    f"missing column; {SHAPES}", source=source, row=number, column=column
                )
        return _prompt_completion_pieces(
            row["prompt"], row["completion"], tokenizer, source, number, row.get("tools")
        ), "prompt"
    if "text" in row:
        return [(require_text(row["text"], source, number, "text"), True, True)], None
    raise DataError(f"{SHAPES}; found columns {sorted(row)}", source=source, row=number)


def _prompt_completion_pieces(
    prompt: Any, completion: Any, tokenizer: Any, source: str, number: int, tools: Any = None
) -> list[Piece]:
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
            tokenizer, prompt, completion, source, number, "completion",
            check_tools(tools, source, number),
        )
        return [(prompt_text, False, False), (completion_text, True, False)]
    prompt = require_text(prompt, source, number, "prompt", allow_empty=True)
    completion = require_text(completion, source, number, "completion")
    return [(prompt, False, False), (completion, True, True)]


def _messages_pieces(
    messages: Any, tokenizer: Any, completion_only_loss: bool, source: str, number: int,
    tools: list[dict] | None = None,
) -> tuple[list[Piece], str | None]:
    messages = check_messages(messages, source, number, "messages")
    if not completion_only_loss:
        # Full-sequence loss needs no turn boundaries: one piece, truncated if too long.
        return [(render(tokenizer, messages, False, source, number, "messages", tools), True,
                 False)], None
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            "no assistant message, so nothing to train on with completion_only_loss",
            source=source,
            row=number,
            column="messages",
        )
    pieces = assistant_segments(tokenizer, messages, source, number, "messages", tools)
    return [(text, trained, False) for text, trained in pieces], "messages"


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

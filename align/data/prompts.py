"""RL prompts: rows `{prompt, ...}` whose other columns reach the reward functions.

`prompt` is a string, or a list of messages rendered with the chat template and the generation
prompt. Every other column is kept as is and passed to rewards by name (TRL's convention).
A conversational prompt keeps its messages too: `reward_columns` hands them to the rewards
(column PROMPT_MESSAGES_COLUMN), so a TRL-style function receives prompts and completions as
TRL's GRPOTrainer passes them for conversational data (reward_models.style_adapters).

`encode_prompt_rows` is the row encoder the cached preparation (`align.data.prepare`) runs; a
prompt of `max_length` tokens or more leaves no room to generate and is unusable
(`align.data.unusable`): skipped or an error as `data.on_unusable` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from align.data.conversations import check_messages, is_messages, render
from align.data.text import encode_many, require_text
from align.data.unusable import KEPT, prompt_too_long, skip_or_raise
from align.errors import DataError
from align.reward_columns import PROMPT_MESSAGES_COLUMN, RESERVED_COLUMNS


@dataclass(frozen=True)
class PromptExample:
    text: str  # the prompt as the model sees it (chat template applied)
    ids: list[int]
    columns: dict[str, Any] = field(default_factory=dict)  # every other column of the row
    messages: list[dict] | None = None  # the prompt's messages, when it is conversational


def tokenize_prompts(rows: list[dict], tokenizer: Any, max_length: int,
                     source: str = "<rows>") -> list[PromptExample]:
    """Validate and tokenise RL prompt rows.

    Raises:
        DataError: no rows, a row without `prompt`, a prompt of the wrong type, a column named
            like one the trainer adds (RESERVED_COLUMNS), or a prompt of `max_length` tokens or
            more (it would leave no room to generate).
    """
    if not rows:
        raise DataError("no prompts", source=source)
    return prompt_examples(encode_prompt_rows(rows, tokenizer, source, 1,
                                              max_length=max_length))


def encode_prompt_rows(rows: list[Any], tokenizer: Any, source: str, first: int, *,
                       max_length: int, on_unusable: str = "error") -> dict[str, list]:
    """Rows (numbered from `first` in `source`) as columns: the prompt's `text` and `ids`, its
    `messages` and the row's other `columns` (each as JSON, so any row's columns fit one
    Arrow type), the prompt's `length`, and why the row was `skipped` (KEPT when it was not:
    with `on_unusable="skip"` a prompt of `max_length` tokens or more is kept as an empty row
    with its reason). Every prompt is encoded in one batched call.

    Raises:
        DataError: as `tokenize_prompts`, for the first bad row.
    """
    plans: list[tuple[str, list[dict] | None, dict[str, Any]]] = []
    failure = None
    for number, row in enumerate(rows, start=first):
        try:
            plans.append(_prompt_plan(row, tokenizer, source, number))
        except DataError as err:  # rows before it may hold an error found only once encoded
            failure = err
            break
    ids = encode_many(tokenizer, [text for text, _, _ in plans])
    out: dict[str, list] = {name: [] for name in (
        "text", "ids", "messages", "columns", "length", "skipped")}
    for number, (text, messages, columns), prompt_ids in zip(range(first, first + len(plans)),
                                                             plans, ids):
        reason = KEPT
        if len(prompt_ids) >= max_length:
            reason = skip_or_raise(prompt_too_long(len(prompt_ids), max_length,
                                                   "to generate", source, number), on_unusable)
            text, prompt_ids, messages, columns = "", [], None, {}
        out["skipped"].append(reason)
        out["text"].append(text)
        out["ids"].append(prompt_ids)
        out["length"].append(len(prompt_ids))
        out["messages"].append(None if messages is None
                               else _json(messages, source, number, "prompt"))
        out["columns"].append(_columns_json(columns, source, number))
    if failure is not None:
        raise failure
    return out


def prompt_examples(columns: dict[str, list]) -> list[PromptExample]:
    """Examples from a batch of `encode_prompt_rows` columns (as read back from a table)."""
    return [PromptExample(text, ids, json.loads(others),
                          None if messages is None else json.loads(messages))
            for text, ids, others, messages in zip(columns["text"], columns["ids"],
                                                   columns["columns"], columns["messages"])]


def reward_columns(examples: list[PromptExample], n_samples: int = 1) -> dict[str, list[Any]]:
    """The columns rewards receive for `examples`, each repeated `n_samples` times in a row:
    every other column of the rows (None where a row lacks it) and, when a prompt is
    conversational, PROMPT_MESSAGES_COLUMN."""
    repeated = [e for e in examples for _ in range(n_samples)]
    names = dict.fromkeys(k for e in examples for k in e.columns)
    columns = {k: [e.columns.get(k) for e in repeated] for k in names}
    if any(e.messages is not None for e in examples):
        columns[PROMPT_MESSAGES_COLUMN] = [e.messages for e in repeated]
    return columns


def _prompt_plan(row: Any, tokenizer: Any, source: str,
                 number: int) -> tuple[str, list[dict] | None, dict[str, Any]]:
    """A row's prompt text (templated), its messages (None for a string prompt) and its other
    columns."""
    if not isinstance(row, dict):
        raise DataError(f"expected a dict of columns, got {type(row).__name__}", source=source,
                        row=number)
    if "prompt" not in row:
        raise DataError(f"RL rows need a 'prompt' column (have: {sorted(row)})",
                        source=source, row=number, column="prompt")
    for name in RESERVED_COLUMNS:
        if name in row:
            raise DataError(f"column {name!r} is set by the trainer for the rewards; "
                            "rename it in the data", source=source, row=number, column=name)
    value, messages = row["prompt"], None
    if is_messages(value):
        messages = check_messages(value, source, number, "prompt")
        text = render(tokenizer, messages, True, source, number, "prompt")
    else:
        text = require_text(value, source, number, "prompt")
    return text, messages, {k: v for k, v in row.items() if k != "prompt"}


def _columns_json(columns: dict[str, Any], source: str, number: int) -> str:
    """The row's other columns as JSON (what the rewards receive, read back exactly)."""
    try:
        return json.dumps(columns)
    except (TypeError, ValueError):
        for name, value in columns.items():
            _json(value, source, number, name)
        raise


def _json(value: Any, source: str, number: int, column: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        raise DataError(f"a {type(value).__name__} value cannot be passed to the rewards; "
                        "give it as a string or number", source=source, row=number,
                        column=column) from None

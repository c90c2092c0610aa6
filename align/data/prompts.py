"""RL prompts: rows `{prompt, ...}` whose other columns reach the reward functions.

`prompt` is a string, or a list of messages rendered with the chat template and the generation
prompt. Every other column is kept as is and passed to rewards by name (TRL's convention).
A conversational prompt keeps its messages too: `reward_columns` hands them to the rewards
(column PROMPT_MESSAGES_COLUMN), so a TRL-style function receives prompts and completions as
TRL's GRPOTrainer passes them for conversational data (reward_models.style_adapters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.data.conversations import check_messages, is_messages, render
from align.data.text import encode, require_text
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
    examples = []
    for number, row in enumerate(rows, start=1):
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
        ids = encode(tokenizer, text)
        if len(ids) >= max_length:
            raise DataError(f"prompt of {len(ids)} tokens is longer than data.max_length="
                            f"{max_length} allows (it must leave room to generate)",
                            source=source, row=number, column="prompt")
        columns = {k: v for k, v in row.items() if k != "prompt"}
        examples.append(PromptExample(text, ids, columns, messages))
    return examples


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

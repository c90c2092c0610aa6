"""RL prompts: rows `{prompt, ...}` whose other columns reach the reward functions.

`prompt` is a string, or a list of messages rendered with the chat template and the generation
prompt. Every other column is kept as is and passed to rewards by name (TRL's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.data.conversations import check_messages, is_messages, render
from align.data.text import encode, require_text
from align.errors import DataError


@dataclass(frozen=True)
class PromptExample:
    text: str  # the prompt as the model sees it (chat template applied)
    ids: list[int]
    columns: dict[str, Any] = field(default_factory=dict)  # every other column of the row


def tokenize_prompts(rows: list[dict], tokenizer: Any, max_length: int,
                     source: str = "<rows>") -> list[PromptExample]:
    """Validate and tokenise RL prompt rows.

    Raises:
        DataError: no rows, a row without `prompt`, a prompt of the wrong type, or a prompt of
            `max_length` tokens or more (it would leave no room to generate).
    """
    if not rows:
        raise DataError("no prompts", source=source)
    examples = []
    for number, row in enumerate(rows, start=1):
        if "prompt" not in row:
            raise DataError(f"RL rows need a 'prompt' column (have: {sorted(row)})",
                            source=source, row=number, column="prompt")
        value = row["prompt"]
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
        examples.append(PromptExample(text, ids, columns))
    return examples

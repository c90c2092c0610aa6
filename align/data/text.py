"""Small pieces the SFT and preference tokenisers share: encoding text and ending it with EOS.

Pieces are always encoded with `add_special_tokens=False`: a prompt and its completion are
encoded separately and joined, so the tokenizer must not add BOS/EOS to each piece (ByT5, for
one, appends `</s>` to every text otherwise).
"""

from __future__ import annotations

from typing import Any

from align.errors import DataError, ModelError


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id; a tokenizer without one cannot mark where a completion ends."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ModelError(
            f"the tokenizer ({type(tokenizer).__name__}) has no EOS token; set "
            "tokenizer.eos_token so completions can be ended"
        )
    return int(eos)


def with_eos(ids: list[int], eos: int) -> list[int]:
    """`ids` ending in `eos` (not doubled when the text already ended with it, as TRL does)."""
    return ids if ids and ids[-1] == eos else [*ids, eos]


def require_text(value: Any, source: str, row: int, column: str, allow_empty: bool = False) -> str:
    """Check that a cell holds a string (a non-empty one unless `allow_empty`)."""
    if not isinstance(value, str):
        raise DataError(
            f"expected a string, got {type(value).__name__}", source=source, row=row, column=column
        )
    if not allow_empty and not value:
        raise DataError("is empty", source=source, row=row, column=column)
    return value

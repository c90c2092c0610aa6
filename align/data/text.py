"""Small pieces the SFT and preference tokenisers share: encoding text and ending it with EOS.

Pieces are always encoded with `add_special_tokens=False`: a prompt and its completion are
encoded separately and joined, so the tokenizer must not add BOS/EOS to each piece (ByT5, for
one, appends `</s>` to every text otherwise).
"""

from __future__ import annotations

from typing import Any

from align.errors import DataError, ModelError


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added (the ids `tokenizer(text,
    add_special_tokens=False)` gives; a fast tokenizer's backend is called directly, which
    skips a third of the time per call)."""
    backend = plain_backend(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, in one batched call of a fast tokenizer's backend."""
    backend = plain_backend(tokenizer)
    if backend is None:
        return [encode(tokenizer, text) for text in texts]
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    return [encoding.ids for encoding in batch(texts, add_special_tokens=False)]


def plain_backend(tokenizer: Any) -> Any:
    """A fast tokenizer's Rust backend set as `tokenizer(text)` sets it for one text (no
    truncation, no padding, special tokens split or not as the tokenizer says), copied once
    and kept on the tokenizer; None for a slow (Python) tokenizer."""
    cached = tokenizer.__dict__.get("_plain_backend")
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if cached is not None and cached[0] == split:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    plain.encode_special_tokens = split
    tokenizer.__dict__["_plain_backend"] = (split, plain)
    return plain


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

"""Small pieces the SFT and preference tokenisers share: encoding text and ending it with EOS.

Pieces are always encoded with `add_special_tokens=False`: a prompt and its completion are
encoded separately and joined, so the tokenizer must not add BOS/EOS to each piece (ByT5, for
one, appends `</s>` to every text otherwise).
"""

from __future__ import annotations

import json
from typing import Any

from align.errors import DataError, ModelError

# Normalizers that leave ASCII text unchanged.
UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added (the ids `tokenizer(text,
    add_special_tokens=False)` gives; a fast tokenizer's backend is called directly, which
    skips a third of the time per call)."""
    backend = plain_backend(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, in one batched call of a fast tokenizer's backend.

    Where the backend's normalizer only applies Unicode normal forms (NFC, NFKC, ...), which
    leave ASCII text as it is, a batch of ASCII texts skips it (a tenth of the encoding time).
    """
    backends = _backends(tokenizer)
    if backends is None:
        return [encode(tokenizer, text) for text in texts]
    backend, ascii_only = backends
    if ascii_only is not None and all(text.isascii() for text in texts):
        backend = ascii_only
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    return [encoding.ids for encoding in batch(texts, add_special_tokens=False)]


def plain_backend(tokenizer: Any) -> Any:
    """A fast tokenizer's Rust backend set as `tokenizer(text)` sets it for one text (no
    truncation, no padding, special tokens split or not as the tokenizer says), copied once
    and kept on the tokenizer; None for a slow (Python) tokenizer."""
    backends = _backends(tokenizer)
    return None if backends is None else backends[0]


def _backends(tokenizer: Any) -> tuple[Any, Any] | None:
    """`plain_backend`, and a copy of it without its normalizer where that normalizer leaves
    ASCII text unchanged (else None); None for a slow tokenizer."""
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    cached = tokenizer.__dict__.get("_plain_backends")
    if cached is not None and cached[0] == split:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    body = backend.to_str()
    skippable = _only_unicode_forms(json.loads(body).get("normalizer"))
    backends = (_plain_copy(body, split),
                _plain_copy(body, split, normalize=False) if skippable else None)
    tokenizer.__dict__["_plain_backends"] = (split, backends)
    return backends


def _plain_copy(body: str, split: bool, normalize: bool = True) -> Any:
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(body)
    plain.no_truncation()
    plain.no_padding()
    plain.encode_special_tokens = split
    if not normalize:
        plain.normalizer = None
    return plain


def _only_unicode_forms(normalizer: dict | None) -> bool:
    """Whether a serialised normalizer is a (sequence of) Unicode normal form(s)."""
    if normalizer is None:
        return False
    if normalizer.get("type") == "Sequence":
        parts = normalizer.get("normalizers") or []
        return bool(parts) and all(_only_unicode_forms(part) for part in parts)
    return normalizer.get("type") in UNICODE_FORMS


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

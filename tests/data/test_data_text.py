"""Encoding text through a fast tokenizer's backend (align.data.text): the ids must be those
`tokenizer(text, add_special_tokens=False)` gives, whichever backend copy encodes them."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align.data.text import _backends, encode, encode_many, plain_backend

WORDS = ["hello", "world", "cafe", "café", "naïve", "Hello", "WORLD", "ﬁne", "fine", "x"]


def fast_tokenizer(normalizer) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids tell apart the forms a normalizer may produce."""
    vocab = {word: index for index, word in enumerate(["[UNK]", *dict.fromkeys(WORDS)])}
    vocab["cafe\u0301"] = len(vocab)  # "café" decomposed (NFD), a token of its own
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


NORMALIZERS = {
    "none": None,
    "nfc": normalizers.NFC(),
    "nfkc": normalizers.NFKC(),
    "nfd": normalizers.NFD(),
    "nfkc+lowercase": normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
    "lowercase": normalizers.Lowercase(),
}
TEXTS = {
    "ascii": ["hello world", "Hello WORLD x", "cafe fine"],
    "unicode": ["café naïve", "ﬁne Hello", "cafe\u0301 world"],
}


@pytest.mark.parametrize("normalizer", NORMALIZERS)
@pytest.mark.parametrize("texts", TEXTS)
def test_batched_ids_equal_the_tokenizers_own(normalizer, texts):
    tokenizer = fast_tokenizer(NORMALIZERS[normalizer])
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS[texts]]
    assert encode_many(tokenizer, TEXTS[texts]) == expected
    assert [encode(tokenizer, text) for text in TEXTS[texts]] == expected


def test_normalizers_change_what_the_checks_see():
    """The cases above are not vacuous: each normalizer changes some text's ids."""
    plain = fast_tokenizer(None)
    for name in ("nfc", "nfkc", "nfd"):
        normalized = fast_tokenizer(NORMALIZERS[name])
        assert [encode(normalized, t) for t in TEXTS["unicode"]] != [
            encode(plain, t) for t in TEXTS["unicode"]], name
    for name in ("lowercase", "nfkc+lowercase"):
        normalized = fast_tokenizer(NORMALIZERS[name])
        assert encode_many(normalized, TEXTS["ascii"]) != encode_many(plain, TEXTS["ascii"])


def test_backend_is_copied_once_and_follows_split_special_tokens():
    tokenizer = fast_tokenizer(NORMALIZERS["nfc"])
    first = plain_backend(tokenizer)
    assert plain_backend(tokenizer) is first
    assert first is not tokenizer.backend_tokenizer
    tokenizer.split_special_tokens = True
    assert plain_backend(tokenizer) is not first
    assert plain_backend(tokenizer).encode_special_tokens


@pytest.mark.parametrize("normalizer,skipped", [("none", False), ("nfc", True), ("nfkc", True),
                                                ("nfd", True), ("nfkc+lowercase", False),
                                                ("lowercase", False)])
def test_ascii_batches_skip_only_unicode_normal_forms(normalizer, skipped):
    """The speed-up is kept where it is safe: a copy without the normalizer exists exactly for
    the normal forms, and ASCII batches are encoded with it."""
    tokenizer = fast_tokenizer(NORMALIZERS[normalizer])
    plain, ascii_only = _backends(tokenizer)
    assert (ascii_only is not None) == skipped
    if skipped:
        assert ascii_only.normalizer is None and plain.normalizer is not None
        ascii_only.add_tokens(["hello world"])  # marks which copy encoded the batch
        assert encode_many(tokenizer, ["hello world"]) == [[ascii_only.token_to_id("hello world")]]

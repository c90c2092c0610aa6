"""Data preparation through `datasets`: the on-disk cache, its key, errors from worker
processes, and the row-by-row path for data Arrow cannot type."""

from __future__ import annotations

import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from align.data import prepare, sft
from align.data.prepare import CacheSettings, preference_encoder, prepare_source, sft_encoder
from align.data.sft import sft_examples, tokenize_sft
from align.data.sources import load_rows
from align.data.tables import ExampleTable
from align.errors import DataError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def chat_row(i: int) -> dict:
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)]
    return {"messages": [{"role": "user", "content": " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small byte-level BPE fast tokenizer with a ChatML template, as real models have."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        [" ".join(WORDS)] * 20, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def encoded(monkeypatch) -> list[int]:
    """Counts the rows the SFT encoder is asked to encode (in this process)."""
    calls: list[int] = []
    real = sft.encode_sft_rows

    def counting(rows, *args, **kwargs):
        calls.append(len(rows))
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(sft, "encode_sft_rows", counting)
    return calls


def folder_of(dataset) -> str:
    return os.path.dirname(dataset.cache_files[0]["filename"])


def test_prepared_rows_equal_in_memory_tokenisation(tmp_path, bpe):
    rows = [chat_row(i) for i in range(300)] + [{"prompt": "alpha", "completion": " beta"}]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"))
    table = ExampleTable(prepare_source(source, "train", {}, bpe, sft_encoder(36, True),
                                        settings, show_progress=False), sft_examples)
    examples, truncated = tokenize_sft(load_rows(source), bpe, 36, True, source)
    assert list(table) == examples
    assert int(table.column("truncated").sum()) == truncated > 0
    assert table.column("length").tolist() == [len(e.input_ids) for e in examples]


def test_cache_is_reused_when_nothing_changed(tmp_path, bpe, monkeypatch):
    source = write_jsonl(tmp_path / "sft.jsonl", [chat_row(i) for i in range(50)])
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"))
    calls = encoded(monkeypatch)
    first = prepare_source(source, "train", {}, bpe, sft_encoder(64, True), settings, False)
    assert sum(calls) == 50
    second = prepare_source(source, "train", {}, bpe, sft_encoder(64, True), settings, False)
    assert sum(calls) == 50  # nothing encoded again
    assert folder_of(first) == folder_of(second)
    assert second["input_ids"] == first["input_ids"]
    # data.cache=false prepares afresh and writes nothing to the cache.
    fresh = CacheSettings(enabled=False, cache_dir=str(tmp_path / "other"))
    prepare_source(source, "train", {}, bpe, sft_encoder(64, True), fresh, False)
    assert sum(calls) == 100
    assert not [p for p in (tmp_path / "other").iterdir() if p.name.startswith("sft-")]


@pytest.mark.parametrize("change", ["data file", "tokenizer", "template", "max_length",
                                    "columns"])
def test_cache_is_rebuilt_when_an_input_changes(tmp_path, bpe, monkeypatch, change):
    rows = [{"question": r["messages"]} for r in (chat_row(i) for i in range(40))]
    source = write_jsonl(tmp_path / "sft.jsonl", rows)
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"))
    tok, max_length, columns = bpe, 64, {"messages": "question"}
    before = prepare_source(source, "train", columns, tok, sft_encoder(max_length, True),
                            settings, False)
    calls = encoded(monkeypatch)
    if change == "data file":
        write_jsonl(tmp_path / "sft.jsonl", rows[:-1])
    elif change == "tokenizer":
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
            bpe.backend_tokenizer.to_str()), eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML
        tok.add_tokens(["alphabeta"])
    elif change == "template":
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
            bpe.backend_tokenizer.to_str()), eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML.replace("<|im_end|>\n", "<|im_end|>\n\n")
    elif change == "max_length":
        max_length = 48
    else:
        write_jsonl(tmp_path / "renamed.jsonl", [{"dialogue": r["question"]} for r in rows])
        source, columns = str(tmp_path / "renamed.jsonl"), {"messages": "dialogue"}
    after = prepare_source(source, "train", columns, tok, sft_encoder(max_length, True),
                           settings, False)
    assert sum(calls) == len(after)  # prepared again, not read from the cache
    assert folder_of(after) != folder_of(before)


def test_unchanged_template_on_a_copied_tokenizer_still_hits_the_cache(tmp_path, bpe,
                                                                       monkeypatch):
    """The key is what the tokenizer does, not which Python object it is."""
    source = write_jsonl(tmp_path / "sft.jsonl", [chat_row(i) for i in range(30)])
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"))
    prepare_source(source, "train", {}, bpe, sft_encoder(64, True), settings, False)
    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
        bpe.backend_tokenizer.to_str()), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    copy.chat_template = CHATML
    calls = encoded(monkeypatch)
    prepare_source(source, "train", {}, copy, sft_encoder(64, True), settings, False)
    assert calls == []


def big_file(tmp_path, bad_row: int, bad: dict) -> str:
    rows = [chat_row(i) for i in range(50_000)]
    rows[bad_row - 1] = bad
    return write_jsonl(tmp_path / "big.jsonl", rows)


def test_a_malformed_row_in_50k_rows_is_named_from_a_worker_process(tmp_path, bpe):
    """Arrow types the column, so the row is found while encoding, by one of two processes."""
    source = big_file(tmp_path, 37_519, {"messages": []})
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"), num_proc=2)
    with pytest.raises(DataError) as err:
        prepare_source(source, "train", {}, bpe, sft_encoder(64, True), settings, False)
    assert str(err.value) == (f"{source}, row 37519, column 'messages': the message list is "
                              "empty")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("sft-")]


def test_a_mistyped_cell_in_50k_rows_is_named_not_converted(tmp_path, bpe):
    """A content that is a number where every other is a string: Arrow would have to convert
    it, so the file is read row by row and the row is named."""
    bad = {"messages": [{"role": "user", "content": "alpha"},
                        {"role": "assistant", "content": 81}]}
    source = big_file(tmp_path, 41_203, bad)
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"big.jsonl, row 41203, column 'messages': message 1 "
                                        r"needs a string 'content', got int"):
        prepare_source(source, "train", {}, bpe, sft_encoder(64, True), settings, False)


def test_text_that_looks_like_a_number_stays_text(tmp_path, bpe):
    """" 81" after 3: cells of one column with two types are never coerced into one."""
    source = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "alpha", "chosen": " 81", "rejected": " 18"},
        {"prompt": "beta", "chosen": 3, "rejected": " 4"}])
    settings = CacheSettings(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"row 2, column 'chosen': expected a string, got int"):
        prepare_source(source, "train", {}, bpe, preference_encoder(64), settings, False)


def test_a_missing_mapped_column_is_named(tmp_path, bpe):
    source = write_jsonl(tmp_path / "sft.jsonl", [chat_row(i) for i in range(5)])
    with pytest.raises(DataError, match=r"row 1, column 'dialogue': missing \(data.columns maps "
                                        r"it to 'messages'"):
        prepare_source(source, "train", {"messages": "dialogue"}, bpe, sft_encoder(64, True),
                       CacheSettings(cache_dir=str(tmp_path / "cache")), False)


def test_automatic_process_count(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert prepare.process_count(0, 10_000) == 1
    assert prepare.process_count(0, 100_000) == 5
    assert prepare.process_count(0, 1_000_000) == 8
    assert prepare.process_count(3, 10) == 3

"""Unpaired preference rows for KTO: one completion per row, labelled desirable or not.

Row shapes follow TRL's KTOTrainer:

- `{prompt, completion, label}`: `label` is true for a desirable completion, false for an
  undesirable one; prompt and completion are strings or message lists, encoded as a
  preference row's prompt and chosen side are (see `align.data.preference`).
- `{prompt, chosen, rejected}` (or `{chosen, rejected}` with an implicit prompt): a pair is
  split into a desirable row (chosen) and an undesirable one (rejected), as TRL's
  `unpair_preference_dataset` does.

A prompt that alone fills `max_length`, and a pair whose chosen equals its rejected, are
unusable (`align.data.unusable`): skipped or an error as `data.on_unusable` says.

KTO's reference point is estimated from mismatched pairs: each row also carries the completion
of another row of its batch (`with_kl_completions`, TRL's rotation by one within a batch), whose
log-probability after this row's prompt the trainer measures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from align.data.batching import collate_packed, collate_padded
from align.data.conversations import is_messages, split_completion
from align.data.preference import _check_conversation, _check_string, _tokenize_pair
from align.data.sft import TokenizedExample
from align.data.text import encode, eos_token_id, with_eos
from align.data.unusable import KEPT, UnusableRow, prompt_too_long, skip_or_raise
from align.errors import DataError
from align.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

SIDES = ("completion", "kl")  # the sequences a batch can hold per row


@dataclass(frozen=True)
class UnpairedExample:
    """One unpaired row: completions are the tokens after the prompt only."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    kl_completion_ids: list[int] = field(default_factory=list)  # another row's completion


def tokenize_unpaired(rows: list[dict], tokenizer: Any, max_length: int,
                      source: str = "<rows>") -> list[UnpairedExample]:
    """Tokenize unpaired rows, splitting preference pairs into two rows (module docstring).

    Args:
        rows: dicts in one of the shapes above (the shape may differ from row to row).
        tokenizer: a Hugging Face tokenizer (with a chat template for message rows).
        max_length: the longest prompt + completion kept; longer completions are cut to fit
            (and keep no EOS), with one warning giving the count.
        source: where the rows came from, for error messages.

    Returns:
        The examples in row order, a pair's desirable row before its undesirable one.

    Raises:
        DataError: a column is missing, empty or of the wrong type; `label` is not true/false;
            the prompt leaves no room for a completion.
    """
    columns = encode_unpaired_rows(rows, tokenizer, source, 1, max_length=max_length)
    warn_truncated(source, sum(columns["truncated"]), len(rows), max_length)
    return [e for row in unpaired_examples(columns) for e in row]


def encode_unpaired_rows(rows: list[Any], tokenizer: Any, source: str, first: int, *,
                         max_length: int, on_unusable: str = "error") -> dict[str, list]:
    """Rows (numbered from `first` in `source`) as columns, one entry per row: `prompt_ids`,
    `completion_ids` and `desirable` (one per side: two for a pair, one for an unpaired row;
    completions cut to fit `max_length`), whether the row was `truncated`, and why it was
    `skipped` (KEPT when it was not: with `on_unusable="skip"` an unusable row is kept with no
    sides and its reason).

    Raises:
        DataError: as `tokenize_unpaired`, for the first bad row.
    """
    out: dict[str, list] = {name: [] for name in (
        "prompt_ids", "completion_ids", "desirable", "truncated", "skipped")}
    for number, row in enumerate(rows, start=first):
        try:
            prompt_ids, sides = _row_sides(row, tokenizer, source, number)
            room = max_length - len(prompt_ids)
            if room <= 0:
                raise prompt_too_long(len(prompt_ids), max_length, "for the completion",
                                      source, number)
        except UnusableRow as err:
            prompt_ids, sides, room = [], [], 0
            out["skipped"].append(skip_or_raise(err, on_unusable))
        else:
            out["skipped"].append(KEPT)
        out["prompt_ids"].append(prompt_ids)
        out["completion_ids"].append([ids[:room] for ids, _ in sides])
        out["desirable"].append([label for _, label in sides])
        out["truncated"].append(any(len(ids) > room for ids, _ in sides))
    return out


def unpaired_examples(columns: dict[str, list]) -> list[list[UnpairedExample]]:
    """Per row of a batch of `encode_unpaired_rows` columns (as read back from a table), its
    examples: a pair's desirable one before its undesirable one."""
    return [[UnpairedExample(prompt_ids, ids, label) for ids, label in zip(completions, labels)]
            for prompt_ids, completions, labels in zip(
                columns["prompt_ids"], columns["completion_ids"], columns["desirable"])]


def warn_truncated(source: str, truncated: int, total: int, max_length: int) -> None:
    """One warning giving how many rows had their completions cut to fit `max_length`."""
    if truncated:
        logger.warning("%s: %d of %d rows were longer than max_length=%d and had their "
                       "completions truncated", source, truncated, total, max_length)


def _row_sides(row: Any, tokenizer: Any, source: str,
               number: int) -> tuple[list[int], list[tuple[list[int], bool]]]:
    """A row's prompt ids and its sides (completion ids, desirable), a pair split in two."""
    if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
        prompt_ids, chosen_ids, rejected_ids = _tokenize_pair(row, tokenizer, source, number)
        return prompt_ids, [(chosen_ids, True), (rejected_ids, False)]
    prompt_ids, completion_ids, label = _tokenize_row(row, tokenizer, source, number)
    return prompt_ids, [(completion_ids, label)]


def with_kl_completions(examples: list[UnpairedExample], batch_size: int,
                        max_length: int) -> list[UnpairedExample]:
    """Give each row the completion of the previous row of its batch (the first row the last's).

    Batches are consecutive runs of `batch_size` rows (the last may be shorter), as TRL's
    KTOTrainer builds them; the mismatched pairs of a batch then use exactly that batch's
    completions. A KL completion is cut to fit its row's prompt within `max_length`.
    """
    out: list[UnpairedExample] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        for index, example in enumerate(batch):
            room = max_length - len(example.prompt_ids)
            kl = batch[index - 1].completion_ids[:room]
            out.append(replace(example, kl_completion_ids=kl))
    return out


def collate_unpaired(examples: list[UnpairedExample], pad_id: int,
                     row_length: int | None = None, attention: str | None = None,
                     sides: tuple[str, ...] = ("completion",)) -> dict[str, torch.Tensor]:
    """A batch of prompt + completion sequences: for each side in `sides`, one per example.

    "completion" is a row's own completion and "kl" its mismatched one, so
    sides=("completion", "kl") gives 2B sequences laid out as a preference batch (B own, then
    B mismatched). Labels cover the completions only. With `attention` (a packing strategy of
    `align.packed_forward`): packed into rows of at most `row_length` tokens, with their
    `PackedLayout` (see `align.data.layout`); else right-padded rows with `attention_mask`.
    `desirable` (B,) bool holds the labels.
    """
    sequences = []
    for side in sides:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        for e in examples:
            completion = e.completion_ids if side == "completion" else e.kl_completion_ids
            sequences.append(TokenizedExample(e.prompt_ids + completion,
                                              [IGNORE_INDEX] * len(e.prompt_ids) + completion))
    if attention is not None:
        batch = collate_packed(sequences, row_length, pad_id, attention)
    else:
        batch = collate_padded(sequences, pad_id)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return batch


def _tokenize_row(row: Any, tokenizer: Any, source: str,
                  number: int) -> tuple[list[int], list[int], bool]:
    if not isinstance(row, dict):
        raise DataError(f"expected a dict of columns, got {type(row).__name__}", source=source,
                        row=number)
    for column in ("prompt", "completion", "label"):
        if column not in row:
            raise DataError("missing column; unpaired rows need `prompt`, `completion` and "
                            "`label` (true for a desirable completion), or give pairs as "
                            "`chosen` and `rejected`", source=source, row=number, column=column)
    prompt, completion, label = row["prompt"], row["completion"], row["label"]
    if not isinstance(label, bool):
        raise DataError(f"expected true or false, got {label!r}", source=source, row=number,
                        column="label")
    if is_messages(prompt):
        _check_conversation(prompt, source, number, "prompt", allow_empty=True)
        _check_conversation(completion, source, number, "completion")
        prompt_text, completion_text = split_completion(tokenizer, prompt, completion, source,
                                                        number, "completion")
        return encode(tokenizer, prompt_text), encode(tokenizer, completion_text), label
    _check_string(prompt, source, number, "prompt", allow_empty=True)
    _check_string(completion, source, number, "completion")
    eos = eos_token_id(tokenizer)
    return encode(tokenizer, prompt), with_eos(encode(tokenizer, completion), eos), label

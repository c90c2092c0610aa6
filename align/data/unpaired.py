"""Unpaired preference rows for KTO: one completion per row, labelled desirable or not.

Row shapes follow TRL's KTOTrainer:

- `{prompt, completion, label}`: `label` is true for a desirable completion, false for an
  undesirable one; prompt and completion are strings or message lists, encoded as a
  preference row's prompt and chosen side are (see `align.data.preference`).
- `{prompt, chosen, rejected}` (or `{chosen, rejected}` with an implicit prompt): a pair is
  split into a desirable row (chosen) and an undesirable one (rejected), as TRL's
  `unpair_preference_dataset` does.

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
    examples: list[UnpairedExample] = []
    truncated = 0
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
            prompt_ids, chosen_ids, rejected_ids = _tokenize_pair(row, tokenizer, source, number)
            sides = [(chosen_ids, True), (rejected_ids, False)]
        else:
            prompt_ids, completion_ids, label = _tokenize_row(row, tokenizer, source, number)
            sides = [(completion_ids, label)]
        room = max_length - len(prompt_ids)
        if room <= 0:
            raise DataError(f"prompt of {len(prompt_ids)} tokens is longer than "
                            f"data.max_length={max_length} allows (no room is left for the "
                            "completion); shorten it or raise data.max_length",
                            source=source, row=number, column="prompt")
        truncated += any(len(ids) > room for ids, _ in sides)
        examples += [UnpairedExample(prompt_ids, ids[:room], label) for ids, label in sides]
    if truncated:
        logger.warning("%s: %d of %d rows were longer than max_length=%d and had their "
                       "completions truncated", source, truncated, len(rows), max_length)
    return examples


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
    `align.packed_forward`): packed into rows of at most `row_length` tokens with
    `position_ids` and `sequence_index` (see `collate_preference_packed`); else right-padded
    rows with `attention_mask`. `desirable` (B,) bool holds the labels.
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

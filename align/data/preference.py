"""Turn preference rows (for reward models and DPO) into prompt, chosen and rejected token ids.

Row shapes follow TRL's conventions:

- `{prompt, chosen, rejected}` strings: each piece is encoded on its own; chosen and rejected
  end with EOS.
- `{prompt, chosen, rejected}` message lists: the prompt is rendered with the chat template's
  generation prompt; a completion is what rendering prompt + completion adds after it, so it
  ends the way the template closes an assistant turn (no EOS is appended, as in TRL).
- `{chosen, rejected}` only (implicit prompt): both are whole conversations or whole strings,
  and their shared beginning becomes the prompt, by TRL's `extract_prompt` rule.

An optional numeric `margin` column (how much better chosen is) is carried through.

Truncation: when prompt + completion is longer than `max_length` the completion is cut to fit
and keeps no EOS (the text did not end there, so the model must not learn to stop there). A
prompt that alone reaches `max_length`, and a pair whose chosen equals its rejected, are
unusable (`align.data.unusable`): skipped or an error as `data.on_unusable` says.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from align.data.conversations import check_messages, is_messages, split_completion
from align.data.text import encode_many, eos_token_id, require_text, with_eos
from align.data.unusable import (
    IDENTICAL_PAIR,
    KEPT,
    UnusableRow,
    prompt_too_long,
    skip_or_raise,
)
from align.errors import DataError

logger = logging.getLogger(__name__)

SHAPES = (
    "preference rows need `chosen` and `rejected` (and optionally `prompt`), all strings "
    "or all message lists"
)


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: completions are the tokens after the prompt only."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None


def tokenize_preference(
    rows: list[dict], tokenizer: Any, max_length: int, source: str = "<rows>"
) -> list[PreferenceExample]:
    """Tokenize preference rows; a warning is logged with the number of truncated pairs.

    Args:
        rows: dicts in one of the shapes in the module docstring.
        tokenizer: a Hugging Face tokenizer (with a chat template for message rows).
        max_length: the longest prompt + completion kept.
        source: where the rows came from, for error messages.

    Returns:
        One example per row, in order.

    Raises:
        DataError: a column is missing, of the wrong type or empty; chosen equals rejected; the
            prompt leaves no room for a completion; `margin` is not a number or is given for
            only some rows.
    """
    columns = encode_preference_rows(rows, tokenizer, source, 1, max_length=max_length)
    margins = columns["margin"]
    for number, margin in enumerate(margins, start=1):
        if (margin is None) != (margins[0] is None):
            raise margin_mismatch(source, number, margins[0] is not None)
    warn_truncated(source, sum(columns["truncated"]), len(rows), max_length)
    return preference_examples(columns)


def encode_preference_rows(rows: list[Any], tokenizer: Any, source: str, first: int, *,
                           max_length: int, on_unusable: str = "error") -> dict[str, list]:
    """Rows (numbered from `first` in `source`) as columns: `prompt_ids`, `chosen_ids`,
    `rejected_ids` (completions cut to fit `max_length`), `margin` (None when absent),
    `length`, whether each was `truncated`, and why it was `skipped` (KEPT when it was not:
    with `on_unusable="skip"` an unusable pair is kept as an empty row with its reason and
    its margin). Every text is encoded in one batched call.

    Raises:
        DataError: as `tokenize_preference` (but for `margin` given for only some rows, which
            is a check across rows), for the first bad row.
    """
    plans: list[tuple[str, str, str, bool] | str] = []  # texts, or why the row is skipped
    failure = None
    for number, row in enumerate(rows, start=first):
        try:
            plans.append(_pair_texts(row, tokenizer, source, number))
        except UnusableRow as err:
            if on_unusable != "skip":
                failure = err
                break
            plans.append(err.reason)
        except DataError as err:  # rows before it may hold an error found only once encoded
            failure = err
            break
    ids = iter(encode_many(tokenizer, [text for plan in plans if not isinstance(plan, str)
                                       for text in plan[:3]]))
    out: dict[str, list] = {name: [] for name in (
        "prompt_ids", "chosen_ids", "rejected_ids", "margin", "length", "truncated",
        "skipped")}
    for number, (row, plan) in enumerate(zip(rows, plans), start=first):
        margin = _margin(row, source, number)
        if not isinstance(plan, str):
            prompt_ids, chosen_ids, rejected_ids = next(ids), next(ids), next(ids)
            try:
                room = _room(prompt_ids, max_length, source, number)
            except UnusableRow as err:
                plan = skip_or_raise(err, on_unusable)
        if isinstance(plan, str):
            for name, value in (("prompt_ids", []), ("chosen_ids", []), ("rejected_ids", []),
                                ("margin", margin), ("length", 0), ("truncated", False),
                                ("skipped", plan)):
                out[name].append(value)
            continue
        if plan[3]:
            eos = eos_token_id(tokenizer)
            chosen_ids, rejected_ids = with_eos(chosen_ids, eos), with_eos(rejected_ids, eos)
        out["skipped"].append(KEPT)
        out["margin"].append(margin)
        out["truncated"].append(len(chosen_ids) > room or len(rejected_ids) > room)
        out["length"].append(len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)))
        out["prompt_ids"].append(prompt_ids)
        out["chosen_ids"].append(chosen_ids[:room])
        out["rejected_ids"].append(rejected_ids[:room])
    if failure is not None:
        raise failure
    return out


def _room(prompt_ids: list[int], max_length: int, source: str, number: int) -> int:
    """Tokens left for a completion after the prompt.

    Raises:
        UnusableRow: none are left.
    """
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise prompt_too_long(len(prompt_ids), max_length, "for the completions", source,
                              number)
    return room


def preference_examples(columns: dict[str, list]) -> list[PreferenceExample]:
    """Examples from a batch of `encode_preference_rows` columns (as read back from a table)."""
    return [PreferenceExample(*fields) for fields in zip(
        columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"],
        columns["margin"])]


def margin_mismatch(source: str, number: int, first_has_margin: bool) -> DataError:
    """The error for a row whose `margin` presence differs from row 1's."""
    return DataError(
        "`margin` must be given for every row or for none (row 1 "
        f"{'has' if first_has_margin else 'has none'})",
        source=source,
        row=number,
        column="margin",
    )


def warn_truncated(source: str, truncated: int, total: int, max_length: int) -> None:
    if truncated:
        logger.warning(
            "%s: %d of %d preference pairs were longer than max_length=%d and had "
            "their completions truncated",
            source,
            truncated,
            total,
            max_length,
        )


def extract_prompt(
    chosen: str | list[dict], rejected: str | list[dict]
) -> tuple[str | list[dict], str | list[dict], str | list[dict]]:
    """Split two completions into (shared prompt, chosen rest, rejected rest).

    The same rule as TRL's `extract_prompt`: the longest common prefix (of characters or of
    messages) is the prompt; a space just before the first difference stays with the
    completions; if one side is a prefix of the other, its last element stays a completion.
    """
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            # index > 0 guard: TRL's version would wrap to chosen[-1] here.
            if index > 0 and chosen[index - 1] == " ":
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


def _tokenize_pair(row: Any, tokenizer: Any, source: str,
                   number: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of one row, completions ended as `_pair_texts` says."""
    *texts, ends_with_eos = _pair_texts(row, tokenizer, source, number)
    prompt_ids, chosen_ids, rejected_ids = encode_many(tokenizer, texts)
    if ends_with_eos:
        eos = eos_token_id(tokenizer)
        chosen_ids, rejected_ids = with_eos(chosen_ids, eos), with_eos(rejected_ids, eos)
    return prompt_ids, chosen_ids, rejected_ids


def _pair_texts(row: Any, tokenizer: Any, source: str,
                number: int) -> tuple[str, str, str, bool]:
    """(prompt, chosen, rejected) texts of a row, and whether the completions end with EOS."""
    if not isinstance(row, dict):
        raise DataError(
            f"expected a dict of columns, got {type(row).__name__}", source=source, row=number
        )
    for column in ("chosen", "rejected"):
        if column not in row:
            raise DataError(f"missing column; {SHAPES}", source=source, row=number, column=column)
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    conversational = is_messages(prompt if prompt is not None else chosen)
    check = _check_conversation if conversational else _check_string
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        check(value, source, number, column)
    if chosen == rejected:  # only once both are known to be well formed
        raise UnusableRow(
            "chosen and rejected are identical, so the pair teaches nothing",
            source=source,
            row=number,
            reason=IDENTICAL_PAIR,
        )
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise DataError(
                "no `prompt` column, and chosen and rejected share no beginning "
                "to take as the prompt; add a `prompt` column",
                source=source,
                row=number,
            )
    else:
        check(prompt, source, number, "prompt", allow_empty=True)
    if conversational:
        prompt_text, chosen_text = split_completion(
            tokenizer, prompt, chosen, source, number, "chosen"
        )
        _, rejected_text = split_completion(tokenizer, prompt, rejected, source, number, "rejected")
        return prompt_text, chosen_text, rejected_text, False
    return prompt, chosen, rejected, True


def _check_string(
    value: Any, source: str, number: int, column: str, allow_empty: bool = False
) -> None:
    if isinstance(value, list):
        raise DataError(
            f"{SHAPES}; this row mixes strings and message lists",
            source=source,
            row=number,
            column=column,
        )
    require_text(value, source, number, column, allow_empty=allow_empty)


def _check_conversation(
    value: Any, source: str, number: int, column: str, allow_empty: bool = False
) -> None:
    if isinstance(value, str):
        raise DataError(
            f"{SHAPES}; this row mixes strings and message lists",
            source=source,
            row=number,
            column=column,
        )
    if not (allow_empty and value == []):
        check_messages(value, source, number, column)


def _margin(row: dict, source: str, number: int) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            f"expected a finite number, got {value!r}", source=source, row=number, column="margin"
        )
    return float(value)

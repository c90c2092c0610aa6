"""Shared-prefix packing: sequences that begin alike run their common prefix once.

A prompt's samples in GRPO or RLOO, and a preference pair's chosen and rejected completions,
repeat the same prompt tokens. A group of such sequences with a common prefix of P tokens is
laid out as one *unit*: the prefix once, then each sequence's own remaining tokens (its
*branch*), one after another:

    [ prompt | completion 1 | completion 2 | ... ]

Each branch token attends to the prefix and to its own branch, never to a sibling branch
(`shared_prefix_mask`), and its position ids continue from P. So every token sees exactly what
it would see alone, and outputs equal separate forwards (checked on the loaded model at
start-up, `align.packed_forward.check_packing`). Units are then placed into rows as single
sequences are (`align.data.packing.best_fit_decreasing`).

A shared batch has `input_ids` (R, W) and its `SharedPrefixLayout` (`align.data.layout`) under
`LAYOUT_KEY`: `position_ids` (R, W), `unit_index` (R, W) (which unit a token belongs to, -1 on
padding), `branch_index` (R, W) (0 on a unit's prefix, i + 1 on its i-th branch), and
`unpack_index` (N, L): the flat position of every token of every sequence, so a prefix
position is shared by all sequences of its unit. The layout reads per-token results back
through `unpack_index`, and reads each next-token log-prob at its predecessor's flat
position (`SharedPrefixLayout.next_token_targets`), since the token after a shared position
differs from one sequence to the next.

The mask costs what it saves on long branches: attention over a row of width W is W x W, so a
unit of 8 long completions computes more attention than the 8 sequences apart. `sharing_pays`
compares the two layouts' estimated cost (linear layers per token, attention per pair of
tokens) and sharing is used where it is cheaper (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.data.layout import LAYOUT_KEY, SharedPrefixLayout
from align.data.packing import best_fit_decreasing, padded_sequences, replace_padded


@dataclass(frozen=True)
class SharePrefix:
    """Settings of shared-prefix packing: the model's hidden size (for `sharing_pays`) and
    whether to share even where the estimate says it does not pay."""

    hidden_size: int
    always: bool = False


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens all `sequences` begin with, leaving each at least one token of its own (its
    last token is where a reward model reads its score); 0 for fewer than two sequences."""
    if len(sequences) < 2:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences[1:]):
        n += 1
    return n


def groups_of_equal_prefix(prefixes: list[list[int]]) -> list[list[int]]:
    """Indices grouped by identical `prefixes` (e.g. prompt ids), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prefix in enumerate(prefixes):
        groups.setdefault(tuple(prefix), []).append(i)
    return list(groups.values())


Units = list[tuple[list[int], int]]  # (members, common prefix length) of each unit


def _units(sequences: list[list[int]], groups: list[list[int]]) -> Units:
    """(members, prefix length) of each unit; every sequence is in exactly one group."""
    return [(members, common_prefix_length([sequences[i] for i in members]))
            for members in groups]


def _unit_length(sequences: list[list[int]], members: list[int], prefix: int) -> int:
    return prefix + sum(len(sequences[i]) - prefix for i in members)


def _layout_cost(lengths: list[int], row_length: int | None, hidden_size: int) -> float:
    """Estimated forward cost of packing items of `lengths` into rows: each row of width W
    costs W token passes through the linear layers (~24 h^2 flops per layer for a
    transformer block) and W^2 attention pairs (~4 h flops per layer): W (1 + W / (6 h))."""
    if not lengths:
        return 0.0
    rows = best_fit_decreasing(lengths, max(lengths) if row_length is None else row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    return len(rows) * width * (1 + width / (6 * hidden_size))


def sharing_pays(sequences: list[list[int]], groups: list[list[int]], row_length: int | None,
                 hidden_size: int) -> bool:
    """Whether the shared layout of `groups` is estimated cheaper than packing `sequences`
    apart (see `_layout_cost`); False when no group shares a token."""
    return _pays(sequences, _units(sequences, groups), row_length, hidden_size)


def _pays(sequences: list[list[int]], units: Units, row_length: int | None,
          hidden_size: int) -> bool:
    if not any(prefix for _, prefix in units):
        return False
    shared = [_unit_length(sequences, members, prefix) for members, prefix in units]
    apart = [len(s) for s in sequences]
    return _layout_cost(shared, row_length, hidden_size) < _layout_cost(apart, row_length,
                                                                         hidden_size)


def pack_shared(sequences: list[list[int]], groups: list[list[int]], row_length: int | None,
                pad_id: int) -> dict[str, Any]:
    """Pack `sequences` with each group's common prefix laid out once (see the module doc).

    Args:
        sequences: token ids of each sequence.
        groups: indices into `sequences`, each sequence in exactly one group; a group of one
            is a sequence packed on its own.
        row_length: tokens per row (None: the longest unit's), as `pack_sequences`.
        pad_id: the id that fills the end of each row.

    Returns:
        `input_ids` (R, W) and the `SharedPrefixLayout` under `LAYOUT_KEY`; its `unpack_index`
        is (N, L) with L the longest sequence (-1 past a sequence's end).
    """
    return _pack_units(sequences, _units(sequences, groups), row_length, pad_id)


def _pack_units(sequences: list[list[int]], units: Units, row_length: int | None,
                pad_id: int) -> dict[str, Any]:
    lengths = [_unit_length(sequences, members, prefix) for members, prefix in units]
    rows = best_fit_decreasing(lengths, max(lengths, default=0) if row_length is None
                               else row_length)
    width = max((sum(lengths[u] for u in row) for row in rows), default=0)
    # Flat Python lists, row after row, made tensors once at the end: per-sequence tensor
    # writes cost more than the forward of a small model's micro-batch.
    ids: list[int] = []
    positions: list[int] = []
    unit_of: list[int] = []
    branch_of: list[int] = []
    longest = max(map(len, sequences), default=0)
    where = [[-1] * longest for _ in sequences]
    for r, row in enumerate(rows):
        for u in row:
            members, prefix = units[u]
            for i in members:
                where[i][:prefix] = range(len(ids), len(ids) + prefix)
            _place(ids, positions, branch_of, sequences[members[0]][:prefix], 0, 0)
            for branch, i in enumerate(members, start=1):
                tokens = sequences[i][prefix:]
                where[i][prefix:len(sequences[i])] = range(len(ids), len(ids) + len(tokens))
                _place(ids, positions, branch_of, tokens, prefix, branch)
            unit_of += [u] * lengths[u]
        pad = (r + 1) * width - len(ids)
        ids += [pad_id] * pad
        positions += [0] * pad
        branch_of += [0] * pad
        unit_of += [-1] * pad

    def grid(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).view(len(rows), width)

    where_index = torch.tensor(where, dtype=torch.long).view(len(sequences), longest)
    return {"input_ids": grid(ids),
            LAYOUT_KEY: SharedPrefixLayout(grid(positions), grid(unit_of), grid(branch_of),
                                           where_index)}


def _place(ids: list[int], positions: list[int], branch_of: list[int], tokens: list[int],
           first_position: int, branch: int) -> None:
    """Append `tokens` on `branch` (0: a prefix), with position ids from `first_position`."""
    ids += tokens
    positions += range(first_position, first_position + len(tokens))
    branch_of += [branch] * len(tokens)


def choose_shared(sequences: list[list[int]], groups: list[list[int]], row_length: int | None,
                  pad_id: int, share: SharePrefix | None) -> dict[str, Any] | None:
    """`pack_shared`'s layout where `share` asks for it and it pays (or `share.always`);
    None where the sequences should be packed apart."""
    if share is None:
        return None
    units = _units(sequences, groups)  # the common prefixes, found once for both
    if not (share.always or _pays(sequences, units, row_length, share.hidden_size)):
        return None
    return _pack_units(sequences, units, row_length, pad_id)


def share_padded(batch: dict[str, torch.Tensor], row_length: int | None, pad_id: int,
                 share: SharePrefix | None, ignore_index: int = -100
                 ) -> dict[str, Any] | None:
    """The shared layout of a right-padded rollout batch, or None (see `choose_shared`).

    Rows whose prompts (the tokens before the first label) are equal form a group. As
    `align.data.packing.pack_padded`, `input_ids` and `attention_mask` are replaced and the
    batch's other tensors kept; `unpack_index` is (B, T), the padded layout's shape.
    """
    if share is None:
        return None
    sequences = padded_sequences(batch)
    labelled = batch["labels"] != ignore_index
    starts = torch.where(labelled.any(-1), labelled.float().argmax(-1),
                         torch.tensor([len(s) for s in sequences])).tolist()
    groups = groups_of_equal_prefix([s[:p] for s, p in zip(sequences, starts)])
    packed = choose_shared(sequences, groups, row_length, pad_id, share)
    return None if packed is None else replace_padded(batch, packed)

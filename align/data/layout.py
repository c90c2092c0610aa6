"""How a collated batch is laid out, as one object that answers what objectives ask of it.

A batch reaches a model in one of three layouts:
  - padded (`PaddedLayout`): `input_ids` and `attention_mask` (B, T), one sequence per row;
    the plain Hugging Face form, and what a batch without a `layout` entry is;
  - packed (`PackedLayout`, built by `align.data.packing`): whole sequences side by side in
    rows (R, W), told apart by `sequence_index`;
  - shared-prefix (`SharedPrefixLayout`, built by `align.data.prefix_sharing`): sequences that
    begin alike laid out as one prefix and a branch per sequence.
The collating code puts the layout object in the batch under `LAYOUT_KEY`; objectives call
`batch_layout(batch)` and ask it for the model's inputs, next-token log-probs (and entropies)
in the padded shifted layout, per-sequence log-prob sums, the last position of each sequence,
or per-token values in the padded layout. Log-probs are read from what the forward left
(`align.chunked_logprobs.LogprobSource`: the full logits, or hidden states and the LM head in
chunks) at (flat position, target) pairs each layout names. They never test which layout they
hold, so every objective works on every layout, and a new layout is one class here.

A packed row sums attention in another order than a padded one, so results agree with the
padded layout to float noise, and each layout with itself exactly.

The maps between layouts (`unpack`, `unpack_shifted`, `sequence_sums`, ...) are here too: they
are how a layout reads per-token and per-sequence results back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Protocol

import torch

from align.losses import IGNORE_INDEX, sequence_logps

LAYOUT_KEY = "layout"  # where a collated batch keeps its layout object

# Turns a boolean (R, 1, W, W) "may attend" mask into the form the model's attention takes.
MaskForModel = Callable[[torch.Tensor], torch.Tensor]
Batch = dict[str, Any]
Entropy = Literal["none", "value", "grad"]  # no entropy; detached (logged); with gradient


class LogprobSource(Protocol):
    """What a forward left to read log-probs from (`align.chunked_logprobs.LogprobSource`)."""

    def logprobs(self, positions: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 entropy: Entropy = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-prob (and entropy) of each target at a flat position, shaped like `positions`."""
        ...


class BatchLayout:
    """What objectives ask of a batch, answered for one layout (see the module docstring)."""

    def model_inputs(self, batch: Batch, device: torch.device,
                     mask_for_model: MaskForModel) -> dict[str, torch.Tensor]:
        """The keyword inputs of a forward pass over `batch`, on `device`."""
        raise NotImplementedError

    def next_token_logprobs(self, source: LogprobSource, batch: Batch, temperature: float,
                            entropy: Entropy = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T-1) log-probs of each labelled next token under softmax(logits / temperature)
        in the padded shifted layout (position t: token t+1 of the sequence), and with
        `entropy` the entropy of each next-token distribution; 0 where the label is ignored.

        Args:
            source: what the model's forward on `batch` left (`align.chunked_logprobs`).
            batch: the batch, its `labels` in the padded layout (B, T).
        """
        return source.logprobs(*self.next_token_targets(batch), temperature, entropy)

    def next_token_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, targets), each (B, T-1): the flat position (row * W + column) whose
        logits predict token t+1 of each sequence (-1: none), and that token's label."""
        raise NotImplementedError

    def sequence_logprobs(self, source: LogprobSource, batch: Batch
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs of each sequence's labelled tokens, and how many there are: (N,)
        each, from the forward's `source` and the batch's `labels` (IGNORE_INDEX: no target)."""
        raise NotImplementedError

    def last_positions(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """(N,) flat position (row * W + column) of each sequence's last token, on `device`:
        where a reward model reads its score."""
        raise NotImplementedError

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token `values` (rows, W, ...) in the padded layout (N, L, ...); 0 past a
        sequence's end."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> BatchLayout:
        """This layout with its tensors on `device` (as a worker moves a batch's tensors)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **moved)


class PaddedLayout(BatchLayout):
    """Right- or left-padded rows, one sequence each: `input_ids`, `attention_mask` (B, T)."""

    def model_inputs(self, batch: Batch, device: torch.device,
                     mask_for_model: MaskForModel) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}

    def next_token_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return row_positions(batch["labels"]), batch["labels"][:, 1:]

    def sequence_logprobs(self, source: LogprobSource, batch: Batch
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        logp, _ = source.logprobs(*self.next_token_targets(batch))
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).to(logp.device)
        return sequence_logps(logp, mask), mask.sum(-1)

    def last_positions(self, batch: Batch, device: torch.device) -> torch.Tensor:
        mask = batch["attention_mask"].to(device)
        positions = torch.arange(mask.shape[1], device=device)
        last = (positions * (mask > 0)).argmax(-1)  # the rightmost token attended to
        return torch.arange(len(last), device=device) * mask.shape[1] + last

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def to(self, device: torch.device | str) -> BatchLayout:
        return self


PADDED = PaddedLayout()


@dataclass(frozen=True, eq=False)
class PackedLayout(BatchLayout):
    """Whole sequences side by side in rows (see `align.data.packing`).

    `labels`, where the batch has them, are in the packed rows, except after `pack_padded`,
    which packs only the forward's inputs: the batch's other tensors stay padded (B, T) and
    `unpack_index` maps each sequence's tokens to their flat packed position.
    """

    position_ids: torch.Tensor  # (R, W) restarting at 0 for every sequence
    sequence_index: torch.Tensor  # (R, W) which sequence a token belongs to, -1 on padding
    attention: str  # how the model is told the boundaries: position_ids or block_mask
    unpack_index: torch.Tensor | None = None  # (N, L) flat position of each token, -1 past end

    def model_inputs(self, batch: Batch, device: torch.device,
                     mask_for_model: MaskForModel) -> dict[str, torch.Tensor]:
        """`input_ids` and `position_ids`, plus a block-diagonal mask for `block_mask`. Rows
        that each hold one sequence (none fitted beside another) are a right-padded batch, and
        are run as one: an attention mask instead of boundaries, at exactly padding's cost."""
        index = self.sequence_index
        if bool(((index == index[:, :1]) | (index < 0)).all()):
            return {"input_ids": batch["input_ids"].to(device),
                    "attention_mask": (index >= 0).long().to(device)}
        inputs = {"input_ids": batch["input_ids"].to(device),
                  "position_ids": self.position_ids.to(device)}
        if self.attention == "block_mask":
            inputs["attention_mask"] = mask_for_model(block_diagonal_mask(index.to(device)))
        return inputs

    def next_token_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # The labels are padded: token t of a sequence sits at its packed position.
        return self._unpack_index()[:, :-1], batch["labels"][:, 1:]

    def sequence_logprobs(self, source: LogprobSource, batch: Batch
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        # Here the labels are packed rows (R, W): shifted within each row.
        labels = batch["labels"]
        token_logps, _ = source.logprobs(row_positions(labels), labels[:, 1:])  # (rows, W-1)
        mask = (labels[:, 1:] != IGNORE_INDEX).to(token_logps.device)
        # A label at column t+1 belongs to the sequence of the token there.
        index = self.sequence_index[:, 1:]
        count = int(self.sequence_index.max()) + 1
        return (sequence_sums(token_logps * mask, index, count),
                sequence_sums(mask.long(), index, count))

    def last_positions(self, batch: Batch, device: torch.device) -> torch.Tensor:
        index = self.sequence_index.to(device)
        return last_token_positions(index, int(index.max()) + 1)

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        return unpack(values, self._unpack_index())

    def _unpack_index(self) -> torch.Tensor:
        if self.unpack_index is None:
            raise ValueError("this packed batch has no map back to the padded layout: pack it "
                             "with unpack_index (align.data.packing.pack_padded)")
        return self.unpack_index


@dataclass(frozen=True, eq=False)
class SharedPrefixLayout(BatchLayout):
    """Units of a common prefix then one branch per sequence (see `align.data.prefix_sharing`);
    `labels` are per sequence, padded (N, L). The token after a shared position differs from
    one sequence to the next, so each token's log-prob is read at its predecessor's flat
    position (`next_token_targets`), never shifted within a row."""

    position_ids: torch.Tensor  # (R, W) continuing from the prefix on every branch
    unit_index: torch.Tensor  # (R, W) which unit a token belongs to, -1 on padding
    branch_index: torch.Tensor  # (R, W) 0 on a unit's prefix, i + 1 on its i-th branch
    unpack_index: torch.Tensor  # (N, L) flat position of each token, a prefix's shared

    def model_inputs(self, batch: Batch, device: torch.device,
                     mask_for_model: MaskForModel) -> dict[str, torch.Tensor]:
        allowed = shared_prefix_mask(self.unit_index.to(device), self.branch_index.to(device))
        return {"input_ids": batch["input_ids"].to(device),
                "position_ids": self.position_ids.to(device),
                "attention_mask": mask_for_model(allowed)}

    def next_token_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unpack_index[:, :-1], batch["labels"][:, 1:]

    def sequence_logprobs(self, source: LogprobSource, batch: Batch
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        token_logps, _ = source.logprobs(*self.next_token_targets(batch))
        labels = batch["labels"][:, 1:].to(token_logps.device)
        return token_logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)

    def last_positions(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return last_positions(self.unpack_index).to(device)

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        return unpack(values, self.unpack_index)


def batch_layout(batch: Batch) -> BatchLayout:
    """The layout of a collated batch (padded where the collator set none)."""
    return batch.get(LAYOUT_KEY, PADDED)


# ------------------------------------------------------------------------- the maps


def row_positions(labels: torch.Tensor) -> torch.Tensor:
    """(R, W-1) flat position of every token but each row's last, for rows `labels` (R, W):
    the positions whose logits predict the row's next token."""
    rows, width = labels.shape
    return (torch.arange(rows)[:, None] * width + torch.arange(width - 1)[None]).to(labels.device)


def unpack(values: torch.Tensor, unpack_index: torch.Tensor) -> torch.Tensor:
    """Per-token `values` (R, W, ...) of a packed batch in the padded layout (B, T, ...).

    Positions past a sequence's end (index -1) are 0.
    """
    flat = values.reshape(-1, *values.shape[2:])
    index = unpack_index.to(values.device)
    valid = index >= 0
    out = flat[index.clamp(min=0)]
    return out * valid.reshape(*valid.shape, *[1] * (out.dim() - valid.dim())).to(out.dtype)


def unpack_shifted(values: torch.Tensor, unpack_index: torch.Tensor) -> torch.Tensor:
    """`unpack` for next-token values (R, W-1): position t concerns token t+1. Returns (B, T-1)."""
    padded = torch.nn.functional.pad(values, (0, 1) if values.dim() == 2 else (0, 0, 0, 1))
    return unpack(padded, unpack_index)[:, :-1]


def sequence_sums(values: torch.Tensor, sequence_index: torch.Tensor,
                  num_sequences: int) -> torch.Tensor:
    """Sum per-token `values` (R, W) over each sequence: (num_sequences,). Padding (-1) is
    dropped. Linear in the tokens (a (sequences x tokens) selection mask would not be)."""
    index = sequence_index.to(values.device).reshape(-1)
    keep = index >= 0
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, index[keep], values.reshape(-1)[keep])


def block_diagonal_mask(sequence_index: torch.Tensor) -> torch.Tensor:
    """(R, 1, W, W) boolean: True where query token q may attend to key k (k <= q, same
    sequence). Padding tokens (-1) see only padding, so no row of the mask is empty."""
    same = sequence_index[:, :, None] == sequence_index[:, None, :]
    width = sequence_index.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_index.device).tril()
    return (same & causal)[:, None]


def last_token_positions(sequence_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(num_sequences,) flat position of each packed sequence's last token: where a reward
    model reads its score. Found from `sequence_index`, never by comparing ids with a pad id
    (where pad is EOS, that would skip the closing EOS)."""
    index = sequence_index.reshape(-1)
    positions = torch.arange(index.numel(), device=index.device)
    real = index >= 0
    last = torch.full((num_sequences,), -1, dtype=torch.long, device=index.device)
    return last.scatter_reduce(0, index[real], positions[real], "amax")


def shared_prefix_mask(unit_index: torch.Tensor, branch_index: torch.Tensor) -> torch.Tensor:
    """(R, 1, W, W) boolean: True where query q may attend to key k: k <= q in the same unit,
    and k on the unit's prefix or on q's own branch. Padding (-1) sees only padding."""
    same_unit = unit_index[:, :, None] == unit_index[:, None, :]
    key_branch = branch_index[:, None, :]
    visible = (key_branch == 0) | (key_branch == branch_index[:, :, None])
    width = unit_index.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=unit_index.device).tril()
    return (same_unit & visible & causal)[:, None]


def last_positions(unpack_index: torch.Tensor) -> torch.Tensor:
    """(N,) flat position of each sequence's last token, from `unpack_index` (N, L)."""
    last = (unpack_index >= 0).sum(-1) - 1
    return unpack_index.gather(1, last.clamp(min=0)[:, None]).squeeze(1)

"""Turn tokenized examples into model-ready tensors: padded, packed, or preference batches.

Packed layouts (rows of bounded length, best-fit decreasing) are described in
`align.data.packing`.

Labels are the input ids with IGNORE_INDEX where no loss is taken; `align.losses` shifts them
by one (position t predicts token t + 1), so nothing here shifts.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from align.data.packing import pack_sequences
from align.data.preference import PreferenceExample
from align.data.prefix_sharing import SharePrefix, choose_shared
from align.data.sft import TokenizedExample
from align.losses import IGNORE_INDEX


def collate_padded(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into one batch.

    Returns:
        `input_ids` (B, T) padded with `pad_id`, `labels` (B, T) with IGNORE_INDEX on padding,
        `attention_mask` (B, T) with 1 on real tokens.
    """
    return _pad(
        [example.input_ids for example in examples],
        [example.labels for example in examples],
        pad_id,
    )


def collate_packed(examples: list[TokenizedExample], row_length: int | None, pad_id: int,
                   attention: str = "position_ids") -> dict[str, Any]:
    """Pack examples into rows of at most `row_length` tokens, without padding between them.

    Each example keeps its own position ids (restarting at 0), so a model told the boundaries
    (see `align.packed_forward`) attends within each example only and the logits equal
    separate forwards. Each example's first label is IGNORE_INDEX so the last token of one
    example is never trained to predict the first token of the next.

    Returns:
        `input_ids` and `labels`, each (R, W), and the `PackedLayout` (see
        `align.data.packing`).
    """
    return pack_sequences([e.input_ids for e in examples], row_length, pad_id, attention,
                          labels=[e.labels for e in examples])


def collate_preference(examples: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones.

    Each row is prompt + completion, right-padded; labels cover the completion only, so
    summing token log-probs over the labels gives log p(completion | prompt).

    Returns:
        `input_ids`, `attention_mask`, `labels`, each (2B, T); and `margin` (B,) float when the
        examples carry margins.
    """
    sequences, labels = _preference_sequences(examples)
    return _with_margins(_pad(sequences, labels, pad_id), examples)


def _preference_sequences(examples: list[PreferenceExample]
                          ) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt + completion ids and completion-only labels: the B chosen, then the B rejected."""
    sequences: list[list[int]] = []
    labels: list[list[int]] = []
    for side in ("chosen_ids", "rejected_ids"):
        for example in examples:
            completion = getattr(example, side)
            sequences.append(example.prompt_ids + completion)
            labels.append([IGNORE_INDEX] * len(example.prompt_ids) + completion)
    return sequences, labels


def _with_margins(batch: dict, examples: list[PreferenceExample]) -> dict:
    margins = [example.margin for example in examples]
    if any(margin is not None for margin in margins):
        if any(margin is None for margin in margins):
            raise ValueError("collate_preference: some examples have a margin and some do not")
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


def collate_preference_packed(examples: list[PreferenceExample], row_length: int | None,
                              pad_id: int, attention: str = "position_ids",
                              share: SharePrefix | None = None
                              ) -> dict[str, Any]:
    """The 2B sequences of `collate_preference` (B chosen, then B rejected) packed into rows.

    As `collate_packed`: rows of at most `row_length` tokens, position ids restarting at 0 for
    every sequence, each sequence's first label IGNORE_INDEX; labels cover completions only.
    The layout's `sequence_index` (0..2B-1, chosen first) says which sequence each token
    belongs to, so per-sequence sums can be taken from the packed rows.

    With `share` (and where it pays, see `align.data.prefix_sharing.choose_shared`), each
    pair's prompt is laid out once, its two completions after it: the batch is then
    `pack_shared`'s, with the labels per sequence (2B, L), right-padded.

    Returns:
        `input_ids` and `labels`, each (R, W) (shared: labels (2B, L)), and the layout (see
        `align.data.layout`); `margin` (B,) float when the examples carry margins.
    """
    sequences, labels = _preference_sequences(examples)
    pairs = [[i, i + len(examples)] for i in range(len(examples))]
    batch = choose_shared(sequences, pairs, row_length, pad_id, share)
    if batch is not None:
        batch["labels"] = _pad(sequences, labels, pad_id)["labels"]
    else:
        batch = pack_sequences(sequences, row_length, pad_id, attention, labels=labels)
    return _with_margins(batch, examples)


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A permutation of example indices in which each run of `batch_size` has similar lengths.

    As Hugging Face's LengthGroupedSampler: shuffle, cut into mega-batches of 50 batches, sort
    each by length (longest first) and cut it into batches; then shuffle the batches. The batch
    with the longest example goes first so an out-of-memory error shows at step one, and a
    short final batch (when `batch_size` does not divide the count) stays last so every other
    batch starts at a multiple of `batch_size`.

    Args:
        lengths: the length of each example.
        batch_size: examples per batch.
        seed: the same seed gives the same order.

    Returns:
        The indices 0..len(lengths)-1 in batch order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    mega_size = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(indices), mega_size):
        mega = sorted(indices[start : start + mega_size], key=lambda i: -lengths[i])
        batches += [mega[i : i + batch_size] for i in range(0, len(mega), batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return [index for batch in batches + short for index in batch]


def example_size(example: Any) -> tuple[int, int]:
    """What an example costs a micro-batch under a token budget: (its sequences, the tokens
    of its longest). An SFT example is one sequence; a preference pair two (chosen, rejected,
    each after the prompt); an unpaired row one, two where it carries another row's
    completion for KTO's reference point (they are collated side by side for it)."""
    if isinstance(example, TokenizedExample):
        return 1, len(example.input_ids)
    if isinstance(example, PreferenceExample):
        return 2, len(example.prompt_ids) + max(len(example.chosen_ids),
                                                len(example.rejected_ids))
    kl = example.kl_completion_ids
    return 1 + bool(kl), len(example.prompt_ids) + max(len(example.completion_ids), len(kl))


def _pad(
    sequences: list[list[int]], labels: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    width = max((len(sequence) for sequence in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (sequence, row_labels) in enumerate(zip(sequences, labels)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        label_ids[row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "labels": label_ids, "attention_mask": attention_mask}

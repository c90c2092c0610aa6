"""Experience making for PPO-family training: sample completions, score them, and lay them out.

A `Rollout` is one iteration's replay buffer: every prompt repeated `n_samples_per_prompt`
times (the samples of a prompt are contiguous rows, as the group estimators expect), its
completions, and right-padded tensors in which only completion tokens carry labels. Forward
passes over it may pack the rows (`Rollout.rows(index, packing)`); results come back padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.data.packing import pack_padded
from align.data.prefix_sharing import share_padded
from align.data.prompts import PromptExample, reward_columns
from align.distributed import WorkerGroup
from align.losses import IGNORE_INDEX
from align.packed_forward import Packing
from align.rollout import Generation, RolloutEngine, Sampling
from align.rollout.verify import shifted_logprobs
from align.trainers.batches import MicroBatching
from align.trainers.dispatch import infer_in_chunks


@dataclass
class Rollout:
    prompts: list[str]  # N prompt texts (each repeated per sample)
    completions: list[str]  # N decoded completions (special tokens removed)
    columns: dict[str, list[Any]]  # other dataset columns, N values each (reward_columns)
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (N, T)
    lengths: list[int]  # completion lengths in tokens (EOS included)
    truncated: list[bool]  # hit max_new_tokens without EOS
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, T-1) per-token data
    pad_id: int = 0  # fills the end of packed rows
    engine_logprobs: torch.Tensor | None = None  # (N, T-1) the engine's sampling log-probs
    # Multi-turn episodes (align.episodes.assemble): which samples count (False: an
    # infrastructure failure, out of its group's baseline), per-turn rewards (N, T-1) on each
    # turn's last token, and the episodes themselves (for logs). None: all count, none.
    valid: list[bool] | None = None
    token_rewards: torch.Tensor | None = None
    episodes: list[Any] | None = None

    @property
    def size(self) -> int:
        return len(self.prompts)

    def size_of(self, index: int) -> tuple[int, int]:
        """(1, tokens) of sample `index`: what it costs a micro-batch under a token budget."""
        return 1, int(self.batch["attention_mask"][index].sum())

    def rows(self, index: list[int], packing: Packing | None = None) -> dict[str, torch.Tensor]:
        """The rows `index` of the batch and per-token tensors, as one micro-batch, no wider
        than its longest sample; with `packing`, the forward's inputs are packed (see
        `align.data.packing.pack_padded`), and the samples of a prompt share its tokens where
        that pays (`packing.share_prefix`, `align.data.prefix_sharing.share_padded`)."""
        idx = torch.tensor(index)
        # Right-padded: columns past the longest of these rows are padding for all of them.
        attended = self.batch["attention_mask"][idx].any(0).nonzero()
        width = int(attended.max()) + 1 if len(attended) else 1
        full = self.batch["input_ids"].shape[1]
        rows = {k: _narrowed(v[idx], full, width)
                for k, v in {**self.batch, **self.tensors}.items()}
        if packing is None:
            return rows
        shared = share_padded(rows, packing.row_length, self.pad_id, packing.share_prefix,
                              IGNORE_INDEX)
        if shared is not None:
            return shared
        return pack_padded(rows, packing.row_length, self.pad_id, packing.attention)


def _narrowed(rows: torch.Tensor, full: int, width: int) -> torch.Tensor:
    """Per-token `rows` (B, full) or shifted (B, full - 1) cut to `width` tokens."""
    if rows.dim() == 2 and rows.shape[1] in (full, full - 1):
        return rows[:, :width - (full - rows.shape[1])]
    return rows


def generate_rollout(engine: RolloutEngine, tokenizer: Any, examples: list[PromptExample],
                     n_samples: int, sampling: Sampling, eos_ids: list[int]) -> Rollout:
    """Sample `n_samples` completions per prompt with the rollout engine, with the log-prob
    the engine sampled each token with (checked against the trainer's, align.rollout.verify)."""
    generation = engine.generate(repeated_ids(examples, n_samples), sampling)
    return assemble_rollout(tokenizer, examples, n_samples, generation, eos_ids)


def repeated_ids(examples: list[PromptExample], n_samples: int) -> list[list[int]]:
    """Each prompt's token ids `n_samples` times in a row (the rows of one rollout)."""
    return [e.ids for e in examples for _ in range(n_samples)]


def assemble_rollout(tokenizer: Any, examples: list[PromptExample], n_samples: int,
                     generation: Generation, eos_ids: list[int]) -> Rollout:
    """The Rollout of `generation`, the completions of `repeated_ids(examples, n_samples)`."""
    repeated = [e for e in examples for _ in range(n_samples)]
    outputs = generation.tokens
    batch = pad_sequences([e.ids for e in repeated], outputs, tokenizer.pad_token_id)
    eos = set(eos_ids)
    return Rollout(
        prompts=[e.text for e in repeated],
        completions=decode_completions(tokenizer, outputs),
        columns=reward_columns(examples, n_samples),
        batch=batch,
        lengths=[len(o) for o in outputs],
        truncated=[not o or o[-1] not in eos for o in outputs],
        engine_logprobs=(shifted_logprobs([len(e.ids) for e in repeated], generation.logprobs,
                                          batch["input_ids"].shape[1])
                         if generation.logprobs is not None else None),
        pad_id=tokenizer.pad_token_id,
    )


def decode_completions(tokenizer: Any, outputs: list[list[int]]) -> list[str]:
    """Each completion's text without special tokens. A slow (Python) tokenizer would look up
    all its special ids again on every `decode` (ByT5's are 128), so they are dropped here,
    looked up once; a fast one skips them itself, in one batch."""
    if tokenizer.is_fast:
        return tokenizer.batch_decode(outputs, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    return [tokenizer.decode([t for t in o if t not in special]) for o in outputs]


def completion_ids(rollout: Rollout) -> list[list[int]]:
    """The generated token ids of every sample (EOS included where generation stopped)."""
    labels = rollout.batch["labels"]
    return [row[row != IGNORE_INDEX].tolist() for row in labels]


def pad_sequences(prompts: list[list[int]], responses: list[list[int]],
                  pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows; labels only on response tokens."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids, mask, labels = [], [], []
    for p, r in zip(prompts, responses):  # lists first: one tensor each, not one per row
        pad = width - len(p) - len(r)
        ids.append(p + r + [pad_id] * pad)
        mask.append([1] * (len(p) + len(r)) + [0] * pad)
        labels.append([IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * pad)
    return {name: torch.tensor(rows, dtype=torch.long)
            for name, rows in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def infer_rows(group: WorkerGroup, fn: Any, rollout: Rollout, micro: MicroBatching,
               packing: Packing | None = None, **kwargs: Any) -> torch.Tensor:
    """Run worker function `fn` (returning (rows, width-1) for rows no wider than their
    longest, `Rollout.rows`) over the whole rollout: (N, T-1) in row order, 0 past a row's
    micro-batch's width."""
    out = torch.zeros(rollout.size, rollout.batch["input_ids"].shape[1] - 1)
    for chunk, value in infer_in_chunks(group, fn, rollout.size,
                                        lambda index: rollout.rows(index, packing),
                                        micro, **kwargs):
        out[torch.tensor(chunk), :value.shape[1]] = value.float()
    return out

"""Experience making for PPO-family training: sample completions, score them, and lay them out.

A `Rollout` is one iteration's replay buffer: every prompt repeated `n_samples_per_prompt`
times (the samples of a prompt are contiguous rows, as the group estimators expect), its
completions, and right-padded tensors in which only completion tokens carry labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.data.prompts import PromptExample
from align.distributed import WorkerGroup
from align.losses import IGNORE_INDEX
from align.trainers.batches import shard_evenly


@dataclass
class Rollout:
    prompts: list[str]  # N prompt texts (each repeated per sample)
    completions: list[str]  # N decoded completions (special tokens removed)
    columns: dict[str, list[Any]]  # other dataset columns, N values each
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (N, T)
    lengths: list[int]  # completion lengths in tokens (EOS included)
    truncated: list[bool]  # hit max_new_tokens without EOS
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, T-1) per-token data

    @property
    def size(self) -> int:
        return len(self.prompts)

    def rows(self, index: list[int]) -> dict[str, torch.Tensor]:
        """The rows `index` of the batch and per-token tensors, as one micro-batch."""
        idx = torch.tensor(index)
        return {k: v[idx] for k, v in {**self.batch, **self.tensors}.items()}


def generate_rollout(group: WorkerGroup, tokenizer: Any, examples: list[PromptExample],
                     n_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int) -> Rollout:
    """Sample `n_samples` completions per prompt on the policy workers."""
    repeated = [e for e in examples for _ in range(n_samples)]
    per_rank = shard_evenly(list(range(len(repeated))), group.size, len(repeated))
    shards = [[repeated[i].ids for i in rank[0]] for rank in per_rank]
    results = group.call_each("generate", [(s,) for s in shards],
                              max_new_tokens=max_new_tokens, do_sample=True,
                              temperature=temperature, top_p=top_p, seed=seed)
    responses: dict[int, list[int]] = {}
    for rank, result in zip(per_rank, results):
        responses.update(zip(rank[0], result))
    eos = tokenizer.eos_token_id
    outputs = [responses[i] for i in range(len(repeated))]
    columns = {key: [e.columns.get(key) for e in repeated]
               for key in (repeated[0].columns if repeated else {})}
    return Rollout(
        prompts=[e.text for e in repeated],
        completions=[tokenizer.decode(o, skip_special_tokens=True) for o in outputs],
        columns=columns,
        batch=pad_sequences([e.ids for e in repeated], outputs, tokenizer.pad_token_id),
        lengths=[len(o) for o in outputs],
        truncated=[not o or o[-1] != eos for o in outputs],
    )


def completion_ids(rollout: Rollout) -> list[list[int]]:
    """The generated token ids of every sample (EOS included where generation stopped)."""
    labels = rollout.batch["labels"]
    return [row[row != IGNORE_INDEX].tolist() for row in labels]


def pad_sequences(prompts: list[list[int]], responses: list[list[int]],
                  pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows; labels only on response tokens."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[row, :n] = torch.tensor(p + r)
        mask[row, :n] = 1
        labels[row, len(p):n] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def infer_rows(group: WorkerGroup, fn: Any, rollout: Rollout, micro_batch_size: int,
               **kwargs: Any) -> torch.Tensor:
    """Run worker function `fn` (returning (rows, T-1)) over the whole rollout, in row order."""
    per_rank = shard_evenly(list(range(rollout.size)), group.size, micro_batch_size)
    batches = [[rollout.rows(chunk) for chunk in rank] for rank in per_rank]
    results = group.call_each("infer", [(fn, b) for b in batches], **kwargs)
    out = torch.zeros(rollout.size, rollout.batch["input_ids"].shape[1] - 1)
    for rank, outputs in zip(per_rank, results):
        for chunk, value in zip(rank, outputs):
            out[torch.tensor(chunk)] = value.float()
    return out

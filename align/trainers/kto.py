"""Driver-side pieces of KTO (`align dpo ... dpo.loss_type=kto`): rows, batches, metrics.

KTO trains on unpaired rows (`align.data.unpaired`). Its reference point z0 is the batch's KL
estimate from mismatched pairs, which TRL builds by rotating completions by one within each
batch of a fixed order. We keep that property and still shuffle: the rows are shuffled once
(seeded) and cut into fixed batches of `trainer.global_batch_size`; each epoch visits the
batches in a fresh seeded order. A row's mismatched completion is then fixed, so its reference
log-prob can be precomputed and cached like every other reference log-prob.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from align.config import DPOConfig
from align.data import UnpairedExample, with_kl_completions
from align.data.prepare import unpaired_encoder
from align.data.unpaired import unpaired_examples, warn_truncated
from align.trainers.stage_data import stage_examples


def load_unpaired_examples(cfg: DPOConfig, tokenizer: Any, show_progress: bool = True
                           ) -> tuple[list[UnpairedExample], list[UnpairedExample],
                                      dict[str, int]]:
    """Training and held-out unpaired rows, shuffled once by `trainer.seed`, each with the
    completion of the previous row of its batch as its mismatched (KL) completion, and the
    rows skipped as unusable as metrics (`StageExamples.skip_metrics`).

    Rows are prepared through the cache like every stage's (`stage_examples`). Pairs (the
    embedded task's, or `{prompt, chosen, rejected}` rows) are split in two. The shuffle also
    keeps the two halves of a pair, which share a prompt, out of each other's mismatched pairs
    (unless they land next to each other by chance).
    """
    data = cfg.data
    batch, max_length = cfg.trainer.global_batch_size, data.max_length
    prepared = stage_examples(cfg, "preference", unpaired_encoder(max_length, data.on_unusable),
                              tokenizer, unpaired_examples, show_progress)
    warn_truncated(prepared.train_name, prepared.truncated(), len(prepared.train), max_length)
    rng = np.random.default_rng(cfg.trainer.seed)
    splits = []
    for rows in (prepared.train, prepared.held_out):
        examples = [e for row in rows for e in row]
        shuffled = [examples[i] for i in rng.permutation(len(examples))]
        splits.append(with_kl_completions(shuffled, batch, max_length))
    return splits[0], splits[1], prepared.skip_metrics()


def fixed_batch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[int]:
    """Example indices of one epoch: the fixed batches [k * batch_size, (k + 1) * batch_size)
    in a seeded order; a last partial batch stays last (`StepSchedule` drops it)."""
    full = num_examples // batch_size
    batches = np.random.default_rng([seed, epoch]).permutation(full).tolist()
    tail = list(range(full * batch_size, num_examples))
    return [b * batch_size + i for b in batches for i in range(batch_size)] + tail


# Sums the workers return, divided by the row count of their side.
SIDE_MEANS = {"rewards/chosen": "desirable", "logps/chosen": "desirable",
              "rewards/rejected": "undesirable", "logps/rejected": "undesirable"}


def unpaired_means(sums: dict[str, float], kl: float) -> dict[str, float]:
    """Driver side: TRL's KTO metric names from the workers' summed contributions.

    Means over desirable rows (`rewards/chosen`, `logps/chosen`) and undesirable rows
    (`rewards/rejected`, `logps/rejected`); a side with no row in the batch is left out, as TRL
    does; `rewards/margins` is the difference of the two reward means; `kl` is z0.
    """
    out = {"loss": sums["loss"], "kl": kl}
    for key, side in SIDE_MEANS.items():
        if sums[side]:
            out[key] = sums[key] / sums[side]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out

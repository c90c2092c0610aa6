"""Checking the engines' weights when rollouts are sampled ahead (`rollout.async_steps`).

A rollout is checked against the trainer's log-probs of the policy version that sampled it
(`align.rollout.verify`): a large gap means the engines generate with something else. In
synchronous mode those are the rollout's own old log-probs. With `async_steps: k` a rollout is
trained on up to k versions after it was sampled, when the trainer no longer holds the weights
that sampled it: its gap also holds the updates in between and cannot tell a failed sync from
learning. Engines change weights only at a sync, so right after each one, while engines and
trainer hold the same version and before that version samples anything ahead, a short probe is
sampled with the rollouts' settings and checked: every rollout is sampled by weights whose
version passed the check, at any iteration.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from align.data.prompts import PromptExample
from align.distributed import WorkerGroup
from align.packed_forward import Packing
from align.rollout import Sampling
from align.rollout.verify import check_logprob_gap, logprob_gap
from align.trainers.ppo_objectives import response_mask, token_logprobs
from align.trainers.rollout import generate_rollout, infer_rows

PROBE_TOKENS = 16  # tokens per probe completion at most: weights that differ show on every one


@dataclass
class SyncProbe:
    """Samples a few completions of an iteration's first prompts and checks their log-probs.

    Attributes:
        rollout_engine: the rollout engine (separate vLLM engines), just synced.
        group: the policy workers, holding the same version.
        tokenizer, eos_ids: as for the rollouts.
        micro_batch_size: trainer.micro_batch_size, for the trainer's forward.
        packing: how the policy's forward packs rows (None: padded).
        n_samples: rollout.n_samples_per_prompt, completions per probe prompt.
        rows: completions per probe at least: one per engine and one per policy worker.
        limit: the mean gap above which the run stops (rollout.vllm.max_logprob_diff).
        logprob_chunk_size: trainer.logprob_chunk_size, for the trainer's forward.
    """

    rollout_engine: Any
    group: WorkerGroup
    tokenizer: Any
    eos_ids: list[int]
    micro_batch_size: int
    packing: Packing | None
    n_samples: int
    rows: int
    limit: float
    logprob_chunk_size: int = 0

    def check(self, examples: list[PromptExample], sampling: Sampling,
              iteration: int) -> dict[str, float]:
        """Probe with `n_samples` completions of each of the first `examples`, sampled as the
        rollouts are (their `sampling`, at most PROBE_TOKENS new tokens).

        Returns:
            `rollout/logprob_diff_mean` and `_max` of the probe, and `time/sync_check`.

        Raises:
            TrainingError: the mean gap is above `limit` (named for 1-based `iteration`).
        """
        start = time.perf_counter()
        prompts = examples[:math.ceil(self.rows / self.n_samples)]
        short = dataclasses.replace(sampling, max_new_tokens=min(PROBE_TOKENS,
                                                                 sampling.max_new_tokens))
        probe = generate_rollout(self.rollout_engine, self.tokenizer, prompts, self.n_samples,
                                 short, self.eos_ids)
        trainer = infer_rows(self.group, token_logprobs, probe, self.micro_batch_size,
                             self.packing, temperature=sampling.temperature,
                             logprob_chunk_size=self.logprob_chunk_size)
        gap = logprob_gap(probe.engine_logprobs, trainer, response_mask(probe.batch))
        check_logprob_gap(gap, self.limit, self.rollout_engine.name, iteration)
        return {**gap, "time/sync_check": time.perf_counter() - start}

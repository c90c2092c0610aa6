"""Checking every sync: the engine's sampling log-probs against the trainer's.

The trainer's "old" log-probs of a rollout's tokens are computed by the policy itself; the
engine reports the log-prob it sampled each token with. If both describe one policy the gap
is numerical noise (about 1e-6 in fp32 on CPU). A large gap means the engine generated with
something else: weights that never arrived, an adapter not applied, another dtype, or sampling
settings the log-probs do not model. The run stops then, naming the gap and those causes.
"""

from __future__ import annotations

import torch

from align.errors import TrainingError


def shifted_logprobs(prompt_lengths: list[int], logprobs: list[list[float]],
                     width: int) -> torch.Tensor:
    """(N, width-1) engine log-probs in the trainer's shifted layout: position t holds the
    log-prob of token t+1, so completion token j of row i sits at prompt_len - 1 + j."""
    out = torch.zeros(len(logprobs), width - 1)
    for row, (start, values) in enumerate(zip(prompt_lengths, logprobs)):
        if values:
            out[row, start - 1:start - 1 + len(values)] = torch.tensor(values)
    return out


GAP_KEYS = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max")  # what logprob_gap gives


def logprob_gap(engine: torch.Tensor, trainer: torch.Tensor,
                mask: torch.Tensor) -> dict[str, float]:
    """`rollout/logprob_diff_mean` and `_max`: |engine - trainer| over completion tokens.

    Args:
        engine, trainer: (N, T) log-probs of the sampled tokens.
        mask: (N, T) 1 on completion tokens.
    """
    gap = (engine - trainer).abs() * mask
    tokens = mask.sum().clamp(min=1)
    return dict(zip(GAP_KEYS, (float(gap.sum() / tokens),
                               float(gap.max()) if gap.numel() else 0.0)))


def max_logprob_diff(setting: float | None, dtype: str, on_gpu: bool) -> float:
    """`rollout.vllm.max_logprob_diff`, or its default for the policy's dtype: fp32 kernels
    agree to ~1e-6, bf16/fp16 ones to ~1e-2 (different kernels round differently)."""
    if setting is not None:
        return setting
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    return 0.01 if dtype == "float32" else 0.1


def check_logprob_gap(gap: dict[str, float], limit: float, engine: str, step: int) -> None:
    """Stop the run when the mean gap exceeds `limit`, naming the likely causes."""
    mean = gap["rollout/logprob_diff_mean"]
    if mean <= limit:
        return
    raise TrainingError(
        f"iteration {step}: the {engine} engine's sampling log-probs differ from the trainer's "
        f"by {mean:.4g} on average (max {gap['rollout/logprob_diff_max']:.4g}; limit "
        f"rollout.vllm.max_logprob_diff={limit:g}). The rollouts were not sampled from the "
        "policy being trained. Likely causes: the weight sync did not reach the engine (or a "
        "LoRA adapter was not applied), the engine runs another dtype, or sampling settings "
        "differ between engine and trainer (repetition_penalty, top-k, min_p from a "
        "generation_config.json, or top_p < 1, which the trainer's log-probs do not model)")

"""The rollout-engine interface: what PPO-family rollouts and held-out evaluation generate with.

An engine turns token-id prompts into completions and, for sampled completions, the log-prob
of every generated token under the distribution it was sampled from (the behaviour policy).
After every policy update the trainer calls `update_weights`; where the backend holds
accelerator memory of its own, `sleep`/`wake` free and restore it around training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    """How to generate. Greedy ignores temperature/top_p; top_k is always off (the policy's
    whole distribution), so that sampling, log-probs and the trainer's loss describe one policy.
    """

    max_new_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # per-call seed; with it, sampling is reproducible
    logprobs: bool = False  # return the sampled tokens' log-probs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """Completions in prompt order: new tokens only, cut after the first EOS (kept)."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None  # per token, same lengths as `tokens`
    span: tuple[float, float] | None = None  # wall-clock (start, end) of generation, if known


class RolloutEngine(Protocol):
    """What the trainers need from a backend (`hf` or `vllm`)."""

    name: str

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Generation:
        """Complete every prompt once (prompts repeat for several samples)."""

    def update_weights(self) -> float:
        """Make the engine generate with the policy's current weights; returns seconds taken."""

    def sleep(self) -> None:
        """Free the engine's accelerator memory while the trainer runs (no-op where none)."""

    def wake(self) -> None:
        """Undo `sleep`; `update_weights` follows before the next generation (an engine may
        finish waking there: vllm reallocates its KV cache after the sync)."""

    def shutdown(self) -> None:
        """Release the engine's actors and resources (safe to call twice)."""


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS (any of `eos_ids`)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens

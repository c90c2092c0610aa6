"""What keeps a learned reward honest under optimisation: ensembles, and shaping of the values.

**Ensembles** score as the members' mean minus k times their spread. Several reward models
trained with different seeds or data orders agree where their training data was dense and
disagree where the policy has wandered off it. Scoring by ``mean - k * std`` across members (the
uncertainty-weighted objective of Coste et al., 2023, "Reward Model Ensembles Help Mitigate
Overoptimization") pays the policy less where the members disagree, so it has no incentive to go
where no member was trained. A config writes an ensemble as a list of reward-model folders::

    rewards:
      - spec: [runs/rm-0/final, runs/rm-1/final, runs/rm-2/final]
        name: reward_model
        uncertainty_penalty: 1.0

Each member is loaded as its own reward (a reward-model folder starts its own Ray actor group),
and the members score each batch concurrently. ``std`` is the population std over the members; a
sample any member leaves unscored (None) gets None.

**Shaping** is a running normalisation, then clipping, of one entry's values. A learned reward's
scale is arbitrary (a Bradley-Terry model is defined up to a shift) and drifts as the policy
moves, so a fixed weight either drowns the KL penalty or is drowned by it. With ``normalize:
true`` each training batch's values are standardised with the mean and std of the last
``normalize_window`` raw values, this batch's included (the window is updated first, so the
first batch is standardised by itself); ``clip: [low, high]`` then bounds the result, so no
single sample's score can dominate an update. Evaluation uses the current statistics without
updating them. The window is part of the trainer's checkpoint, so a resumed run normalises
exactly as the uninterrupted one.

``None`` values (the reward does not apply) are neither counted nor changed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from align.errors import ConfigError, RewardError

EPSILON = 1e-8  # added to the std, so a constant window does not divide by zero


def ensemble_values(member_values: Sequence[Sequence[float | None]], penalty: float
                    ) -> tuple[list[float | None], list[float | None]]:
    """(mean - penalty * std, std) per sample over the members' values (None where any
    member gave None)."""
    scores: list[float | None] = []
    spreads: list[float | None] = []
    for column in zip(*member_values):
        if any(v is None for v in column):
            scores.append(None)
            spreads.append(None)
            continue
        mean = math.fsum(column) / len(column)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in column) / len(column))
        scores.append(mean - penalty * std)
        spreads.append(std)
    return scores, spreads


class EnsembleReward:
    """Members scored together; calling it returns ``mean - penalty * std`` per sample.

    Args:
        members: callables with the Reward protocol (synchronous), at least two.
        penalty: k, the weight of the members' std (0: the plain mean).
        label: the spec as written, for messages.

    After each call, ``last_spread`` holds the per-sample std across members.
    """

    def __init__(self, members: Sequence[Callable[..., Any]], penalty: float = 1.0,
                 label: str = "ensemble") -> None:
        if len(members) < 2:
            raise ConfigError(f"reward {label!r}: an ensemble needs at least two members, "
                              f"got {len(members)}")
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not (
                0 <= penalty < math.inf):
            raise ConfigError(f"reward {label!r}: uncertainty_penalty must be a finite number "
                              f">= 0, got {penalty!r}")
        self.members = list(members)
        self.penalty = float(penalty)
        self.label = label
        self.last_spread: list[float | None] = []

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any
                 ) -> list[float | None]:
        with ThreadPoolExecutor(len(self.members)) as pool:
            futures = [pool.submit(m, prompts=prompts, completions=completions, **columns)
                       for m in self.members]
            member_values = [f.result() for f in futures]
        for i, values in enumerate(member_values):
            if len(values) != len(prompts):
                raise RewardError(f"reward {self.label!r}: member {i} returned "
                                  f"{len(values)} values for {len(prompts)} samples")
        scores, self.last_spread = ensemble_values(member_values, self.penalty)
        return scores

    def close(self) -> None:
        for member in self.members:
            close = getattr(member, "close", None)
            if callable(close):
                close()


class RewardShaping:
    """Normalisation and clipping of one reward's values.

    Args:
        normalize: standardise with a running mean and std.
        window: how many of the latest raw values the statistics cover.
        clip: (low, high) bounds applied last; None: no clipping.
        label: the reward's spec, for messages.

    Raises:
        ConfigError: a window below 2, or bounds that are not two finite numbers low < high.
    """

    def __init__(self, normalize: bool = False, window: int = 4096,
                 clip: Sequence[float] | None = None, label: str = "reward") -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ConfigError(f"reward {label!r}: normalize_window must be an integer >= 2, "
                              f"got {window!r}")
        if clip is not None:
            if (not isinstance(clip, Sequence) or len(clip) != 2
                    or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in clip)
                    or not clip[0] < clip[1]):
                raise ConfigError(f"reward {label!r}: clip must be [low, high] with finite "
                                  f"low < high, got {clip!r}")
            clip = (float(clip[0]), float(clip[1]))
        self.normalize = bool(normalize)
        self.clip = clip
        self.values: deque[float] = deque(maxlen=window)

    @property
    def active(self) -> bool:
        return self.normalize or self.clip is not None

    def statistics(self) -> tuple[float, float]:
        """(mean, std) of the window; (0, 1) while it is empty."""
        if not self.values:
            return 0.0, 1.0
        mean = math.fsum(self.values) / len(self.values)
        var = math.fsum((v - mean) ** 2 for v in self.values) / len(self.values)
        return mean, math.sqrt(var)

    def __call__(self, values: Sequence[float | None], update: bool = True
                 ) -> list[float | None]:
        """The shaped values; with `update`, the raw values join the window first."""
        if self.normalize and update:
            self.values.extend(v for v in values if v is not None)
        mean, std = self.statistics() if self.normalize else (0.0, 1.0)
        scale = 1.0 / (std + EPSILON) if self.normalize else 1.0
        out: list[float | None] = []
        for v in values:
            if v is None:
                out.append(None)
                continue
            shaped = (v - mean) * scale
            if self.clip is not None:
                shaped = min(max(shaped, self.clip[0]), self.clip[1])
            out.append(shaped)
        return out

    def state(self) -> dict[str, Any]:
        return {"values": list(self.values)}

    def load(self, state: dict[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state.get("values", []))

"""The checks every iteration's episodes pass before training: infrastructure failures within
`environment.max_infra_failure_fraction`, and drift as `environment.on_drift` says."""

from __future__ import annotations

import logging

from align.config import EnvironmentConfig
from align.episodes.episode import Episode
from align.errors import TrainingError

log = logging.getLogger(__name__)


def episode_checks(episodes: list[Episode], cfg: EnvironmentConfig, name: str,
                   step: int) -> None:
    """Stop the run where the environment failed too often, or (on_drift: error) where an
    episode's re-rendered conversation departs from its trained tokens; else log drift.

    Raises:
        TrainingError: naming the environment and the first error, or the drifting turn.
    """
    failed = [e for e in episodes if e.infra_error is not None]
    if episodes and len(failed) / len(episodes) > cfg.max_infra_failure_fraction:
        raise TrainingError(
            f"iteration {step + 1}: {len(failed)} of {len(episodes)} episodes of environment "
            f"{name} failed for infrastructure reasons, more than "
            f"environment.max_infra_failure_fraction={cfg.max_infra_failure_fraction:g}; the "
            f"first: {failed[0].infra_error}")
    drifted = [(i, e) for i, e in enumerate(episodes) if e.drift is not None]
    if not drifted:
        return
    index, first = drifted[0]
    text = (f"iteration {step + 1}: episode {index}'s conversation, rendered with the chat "
            f"template, is not the token stream trained on ({len(drifted)} of {len(episodes)} "
            f"episodes drift) {first.drift.describe()}")
    if cfg.on_drift == "error":
        raise TrainingError(text + " (environment.on_drift=error)")
    log.warning("%s; training on the sampled tokens (environment.on_drift=report)", text)

"""Project exceptions: errors meant for people, printed by the CLI without a traceback (exit 2)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class AlignError(Exception):
    """Base class for every user-facing error; the CLI prints it and exits with status 2."""


class ConfigError(AlignError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


# Our column name -> the user's, while their rows are prepared (`data.columns`): DataErrors then
# name the column as it is in their data.
_COLUMN_ALIASES: ContextVar[dict[str, str] | None] = ContextVar("column_aliases", default=None)


@contextmanager
def column_aliases(columns: dict[str, str]) -> Iterator[None]:
    """Within the block, a DataError about column `ours` names `columns[ours]` instead."""
    token = _COLUMN_ALIASES.set(dict(columns))
    try:
        yield
    finally:
        _COLUMN_ALIASES.reset(token)


class DataError(AlignError):
    """A dataset is unreadable or a row is malformed.

    The message names the source, the 1-based row and the column where they are known.
    """

    def __init__(self, message: str, source: str | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            column = (_COLUMN_ALIASES.get() or {}).get(column, column)
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.source, self.row, self.column = source, row, column


class ModelError(AlignError):
    """A model or tokenizer cannot be loaded or wrapped as configured."""


class RewardError(AlignError):
    """A reward function, model or endpoint failed; the message names the reward spec."""


class TrainingError(AlignError):
    """Training cannot continue (non-finite loss, a worker died, ...)."""


class OutputDirError(AlignError):
    """The output folder holds a previous run and neither resume nor overwrite was asked for."""


def did_you_mean(word: str, options: list[str], otherwise: str = "", prefix: str = "",
                 cutoff: float = 0.6) -> str:
    """The hint an unknown-name message ends with: `; did you mean 'x'?` for the closest of
    `options` (shown with `prefix`, e.g. a config section), else `otherwise`."""
    import difflib

    close = difflib.get_close_matches(str(word), options, n=1, cutoff=cutoff)
    return f"; did you mean '{prefix}{close[0]}'?" if close else otherwise


class InfrastructureError(AlignError):
    """The machinery around user or model code failed, not the code itself (a sandbox that
    cannot start, a service that does not answer): counted apart from the code's own errors."""


class CheckpointError(AlignError):
    """A checkpoint cannot be loaded safely: it needs code to load, or it is unreadable."""


class EpisodeError(AlignError):
    """An environment failed during an episode: its constructor, `reset`, `step` or
    `get_reward` raised or returned the wrong type. The message names the environment and the
    method; the episode counts as an infrastructure failure, not as the model's mistake."""

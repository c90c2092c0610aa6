"""Where each stage's examples come from: the task for `data.train: embedded`, else the files.

Files go through `align.data.prepare` (Arrow, parallel, cached) and reach the trainer as
`ExampleTable`s that read rows on demand; the embedded task's rows (generated in a moment) are
encoded in memory. Rows skipped as unusable (`align.data.unusable`) are counted per split and
left out of both. Every trainer reads its rows through `stage_rows` or `stage_examples`, so
the embedded task reaches trainers only through the task interface (`align.tasks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import datasets
import numpy as np

from align.config import EMBEDDED, DataConfig, RunConfig
from align.data import PreferenceExample, PromptExample, load_rows
from align.data.preference import preference_examples, warn_truncated
from align.data.prepare import (
    CacheSettings,
    RowEncoder,
    check_margins,
    preference_encoder,
    prepare_rows,
    prepare_source,
    prompt_encoder,
    read_renamed,
)
from align.data.prompts import prompt_examples
from align.data.sources import rename_columns
from align.data.tables import ExampleTable
from align.data.unusable import KEPT, check_skipped_share, count_skipped, skipped_metrics
from align.errors import DataError
from align.tasks import RowKind, TaskRows, load_task
from align.trainers.evaluation import Evaluator, exact_match

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass
class StageExamples(Generic[T]):
    """One stage's prepared examples: training ones (read on demand), held-out ones (a list:
    held-out sets are small), and the raw held-out rows for scoring generations. Rows skipped
    as unusable (`align.data.unusable`) are in none of them, only in the counts."""

    train: ExampleTable[T]
    held_out: list[T]
    held_out_rows: Callable[[], Iterable[dict]]
    train_name: str
    held_out_name: str
    skipped: dict[str, int] = field(default_factory=dict)  # training rows left out, per reason
    held_out_skipped: dict[str, int] = field(default_factory=dict)  # held-out rows, per reason

    def truncated(self) -> int:
        """Training examples cut to data.max_length."""
        return int(self.train.column("truncated").sum())

    def skip_metrics(self) -> dict[str, int]:
        """`data/skipped/<reason>` (training rows) and `data/held_out_skipped/<reason>`, for
        metrics.jsonl and summary.json; empty when no row was skipped."""
        return {**skipped_metrics(self.skipped),
                **skipped_metrics(self.held_out_skipped, "data/held_out_skipped/")}


@dataclass
class _Split:
    """Rows `indices` of a prepared table whose `skipped` column is `reasons`."""

    table: datasets.Dataset
    reasons: np.ndarray
    indices: np.ndarray
    name: str

    def usable(self) -> tuple[np.ndarray, dict[str, int]]:
        """The indices of usable rows, and the others counted per reason."""
        picked = self.reasons[self.indices]
        return self.indices[picked == KEPT], count_skipped(picked)


def stage_examples(cfg: RunConfig, kind: RowKind, encoder: RowEncoder, tokenizer: Any,
                   build: Callable[[dict[str, list]], list[T]], show_progress: bool = True,
                   check: Callable[[Any, str], None] | None = None) -> StageExamples[T]:
    """Training and held-out examples of a stage, as `encoder` encodes its rows: the task's
    (`data.train: embedded`), else the configured files, prepared through the cache, with
    held-out rows from `data.eval` or `data.eval_fraction` of train held out by the seed.
    `check(prepared_dataset, source)` runs on each whole source (checks across rows).

    Raises:
        DataError: a row is malformed, or a source has more unusable rows than
            `data.max_skipped_fraction` allows (see `align.data.unusable`).
    """
    check = check or (lambda table, source: None)
    data = cfg.data

    def split(source: str, table: datasets.Dataset,
              indices: np.ndarray | None = None) -> _Split:
        check(table, source)
        reasons = _reasons(table)
        check_skipped_share(count_skipped(reasons), len(table), source,
                            data.max_skipped_fraction, data.max_length)
        return _Split(table, reasons, np.arange(len(table)) if indices is None else indices,
                      source)

    if data.train == EMBEDDED:
        rows = load_task(cfg.task).rows(kind)
        train = split(rows.train_name, prepare_rows(rows.train, tokenizer, encoder,
                                                    rows.train_name))
        held = split(rows.held_out_name, prepare_rows(rows.held_out, tokenizer, encoder,
                                                      rows.held_out_name))
        return _stage_examples(build, train, held, lambda: rows.held_out)
    settings = CacheSettings(data.cache, data.cache_dir, data.num_proc)

    def prepared(source: str) -> datasets.Dataset:
        return prepare_source(source, data.split, data.columns, tokenizer, encoder, settings,
                              show_progress)

    if data.eval:
        return _stage_examples(build, split(data.train, prepared(data.train)),
                               split(data.eval, prepared(data.eval)),
                               lambda: read_renamed(data.eval, data.split, data.columns))
    table = prepared(data.train)
    if data.eval_fraction <= 0:
        return _stage_examples(build, split(data.train, table), None, lambda: [])
    train_idx, held_idx = held_out_split(len(table), data.eval_fraction, cfg.trainer.seed,
                                         data.train)
    train = split(data.train, table, train_idx)
    held = _Split(table, train.reasons, held_idx, data.train)
    return _stage_examples(build, train, held,
                           lambda: read_renamed(data.train, data.split, data.columns))


def _stage_examples(build: Callable[[dict[str, list]], list[T]], train: _Split,
                    held: _Split | None, raw_held: Callable[[], Any]) -> StageExamples[T]:
    """The usable rows of each split as examples; `raw_held()` indexes the held-out rows as
    the source holds them (for scoring generations)."""
    train_rows, skipped = train.usable()
    every = len(train_rows) == len(train.table)  # the whole table: no index to keep
    examples = ExampleTable(train.table, build, None if every else train_rows)
    held_rows, held_skipped = held.usable() if held is not None else (np.arange(0), {})
    held_out = ExampleTable(held.table, build, held_rows)[:] if held is not None else []
    _warn_skipped(train.name, "training", skipped, len(train.indices))
    if held is not None:
        _warn_skipped(held.name, "held-out", held_skipped, len(held.indices))

    def held_out_rows() -> Iterator[dict]:
        rows = raw_held()
        return (rows[int(i)] for i in held_rows)

    return StageExamples(examples, held_out, held_out_rows, train.name,
                         held.name if held is not None else train.name, skipped, held_skipped)


def _warn_skipped(source: str, split: str, counts: dict[str, int], total: int) -> None:
    if counts:
        logger.warning("%s: %d of %d %s rows skipped as unusable (%s); data.on_unusable=error "
                       "stops at the first instead", source, sum(counts.values()), total, split,
                       ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())))


def _reasons(table: datasets.Dataset) -> np.ndarray:
    """The `skipped` column of a prepared table (KEPT for a usable row)."""
    if len(table) == 0:
        return np.array([], dtype=object)
    return table.with_format("arrow", columns=["skipped"])[:]["skipped"].to_numpy(
        zero_copy_only=False)


def held_out_split(num_rows: int, fraction: float, seed: int,
                   source: str) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) row indices, each ascending: `fraction` of the rows (at least
    one) held out by a permutation drawn from `seed`."""
    order = np.random.default_rng(seed).permutation(num_rows)
    n_eval = max(1, int(num_rows * fraction))
    if n_eval >= num_rows:
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows", source=source)
    held = np.zeros(num_rows, dtype=bool)
    held[order[:n_eval]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def stage_rows(cfg: RunConfig, kind: RowKind) -> TaskRows:
    """Training and held-out rows of one stage as Python dicts: the task's
    (`data.train: embedded`), or `load_train_eval_rows` of the configured files."""
    if cfg.data.train == EMBEDDED:
        return load_task(cfg.task).rows(kind)
    return load_train_eval_rows(cfg.data, cfg.trainer.seed)


def load_train_eval_rows(data: DataConfig, seed: int) -> TaskRows:
    """Rows of a dataset: held-out rows from `data.eval` when given, else `data.eval_fraction`
    of train held out by `seed` (none when 0), as `held_out_split` splits them."""
    rows = rename_columns(load_rows(data.train, data.split), data.columns, data.train)
    if data.eval:
        held_out = rename_columns(load_rows(data.eval, data.split), data.columns, data.eval)
        return TaskRows(rows, held_out, data.train, data.eval)
    if data.eval_fraction <= 0:
        return TaskRows(rows, [], data.train, data.train)
    train_idx, held_idx = held_out_split(len(rows), data.eval_fraction, seed, data.train)
    return TaskRows([rows[i] for i in train_idx], [rows[i] for i in held_idx],
                    data.train, data.train)


def load_preference_examples(cfg: RunConfig, tokenizer: Any, show_progress: bool = True
                             ) -> StageExamples[PreferenceExample]:
    """Training and held-out preference pairs (see `stage_examples`); a warning says how many
    had their completions truncated, and `margin` must be given for every row or none."""
    data = cfg.data
    examples = stage_examples(cfg, "preference",
                              preference_encoder(data.max_length, data.on_unusable), tokenizer,
                              preference_examples, show_progress, check_margins)
    warn_truncated(examples.train_name, examples.truncated(), len(examples.train),
                   data.max_length)
    return examples


def load_prompt_examples(cfg: RunConfig, tokenizer: Any, show_progress: bool = True
                         ) -> StageExamples[PromptExample]:
    """Training and held-out RL prompts (see `stage_examples`), templated and tokenised once
    and read from the cache on later launches."""
    data = cfg.data
    return stage_examples(cfg, "rl", prompt_encoder(data.max_length, data.on_unusable),
                          tokenizer, prompt_examples, show_progress)


def stage_evaluator(cfg: RunConfig) -> Evaluator:
    """How held-out completions are judged: the task's evaluator for `data.train: embedded`,
    else exact match with the reference (white space stripped)."""
    if cfg.data.train == EMBEDDED:
        return load_task(cfg.task).is_correct
    return exact_match

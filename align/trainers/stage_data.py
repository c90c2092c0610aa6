"""Where each stage's examples come from: the task for `data.train: embedded`, else the files.

Files go through `align.data.prepare` (Arrow, parallel, cached) and reach the trainer as
`ExampleTable`s that read rows on demand; the embedded task's rows (generated in a moment) are
encoded in memory. Every trainer reads its rows through `stage_rows` or `stage_examples`, so
the embedded task reaches trainers only through the task interface (`align.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from align.config import EMBEDDED, DataConfig, RunConfig
from align.data import PreferenceExample, load_rows
from align.data.preference import preference_examples, warn_truncated
from align.data.prepare import (
    CacheSettings,
    RowEncoder,
    check_margins,
    preference_encoder,
    prepare_rows,
    prepare_source,
    read_renamed,
)
from align.data.sources import rename_columns
from align.data.tables import ExampleTable
from align.errors import DataError
from align.tasks import RowKind, TaskRows, load_task
from align.trainers.evaluation import Evaluator, exact_match

T = TypeVar("T")


@dataclass
class StageExamples(Generic[T]):
    """One stage's prepared examples: training ones (read on demand), held-out ones (a list:
    held-out sets are small), and the raw held-out rows for scoring generations."""

    train: ExampleTable[T]
    held_out: list[T]
    held_out_rows: Callable[[], Iterable[dict]]
    train_name: str
    held_out_name: str

    def truncated(self) -> int:
        """Training examples cut to data.max_length."""
        return int(self.train.column("truncated").sum())


def stage_examples(cfg: RunConfig, kind: RowKind, encoder: RowEncoder, tokenizer: Any,
                   build: Callable[[dict[str, list]], list[T]], show_progress: bool = True,
                   check: Callable[[Any, str], None] | None = None) -> StageExamples[T]:
    """Training and held-out examples of a stage, as `encoder` encodes its rows: the task's
    (`data.train: embedded`), else the configured files, prepared through the cache, with
    held-out rows from `data.eval` or `data.eval_fraction` of train held out by the seed.
    `check(prepared_dataset, source)` runs on each whole source (checks across rows)."""
    check = check or (lambda table, source: None)
    if cfg.data.train == EMBEDDED:
        rows = load_task(cfg.task).rows(kind)
        train = prepare_rows(rows.train, tokenizer, encoder, rows.train_name)
        held = prepare_rows(rows.held_out, tokenizer, encoder, rows.held_out_name)
        check(train, rows.train_name)
        check(held, rows.held_out_name)
        return StageExamples(ExampleTable(train, build), list(ExampleTable(held, build)),
                             lambda: rows.held_out, rows.train_name, rows.held_out_name)
    data = cfg.data
    settings = CacheSettings(data.cache, data.cache_dir, data.num_proc)

    def prepared(source: str) -> ExampleTable[T]:
        table = prepare_source(source, data.split, data.columns, tokenizer, encoder,
                               settings, show_progress)
        check(table, source)
        return ExampleTable(table, build)

    table = prepared(data.train)
    if data.eval:
        held = prepared(data.eval)
        return StageExamples(table, list(held),
                             lambda: read_renamed(data.eval, data.split, data.columns),
                             data.train, data.eval)
    if data.eval_fraction <= 0:
        return StageExamples(table, [], lambda: [], data.train, data.train)
    train_idx, held_idx = held_out_split(len(table), data.eval_fraction, cfg.trainer.seed,
                                         data.train)

    def held_rows() -> Iterator[dict]:
        rows = read_renamed(data.train, data.split, data.columns)
        return (rows[int(i)] for i in held_idx)

    return StageExamples(table.select(train_idx), table.select(held_idx).take(range(len(
        held_idx))), held_rows, data.train, data.train)


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
    examples = stage_examples(cfg, "preference", preference_encoder(cfg.data.max_length),
                              tokenizer, preference_examples, show_progress, check_margins)
    warn_truncated(examples.train_name, examples.truncated(), len(examples.train),
                   cfg.data.max_length)
    return examples


def stage_evaluator(cfg: RunConfig) -> Evaluator:
    """How held-out completions are judged: the task's evaluator for `data.train: embedded`,
    else exact match with the reference (white space stripped)."""
    if cfg.data.train == EMBEDDED:
        return load_task(cfg.task).is_correct
    return exact_match

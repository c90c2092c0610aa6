"""Where each stage's rows come from: the task for `data.train: embedded`, else the files.

Every trainer reads its training and held-out rows through `stage_rows`, so the embedded task
reaches trainers only through the task interface (`align.tasks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from align.config import EMBEDDED, DataConfig, RunConfig
from align.data import PreferenceExample, load_rows, tokenize_preference
from align.data.sources import rename_columns
from align.errors import DataError
from align.tasks import RowKind, TaskRows, load_task
from align.trainers.evaluation import Evaluator, exact_match


def stage_rows(cfg: RunConfig, kind: RowKind) -> TaskRows:
    """Training and held-out rows of one stage: the task's (`data.train: embedded`), or
    `load_train_eval_rows` of the configured files."""
    if cfg.data.train == EMBEDDED:
        return load_task(cfg.task).rows(kind)
    return load_train_eval_rows(cfg.data, cfg.trainer.seed)


def load_train_eval_rows(data: DataConfig, seed: int) -> TaskRows:
    """Rows of a dataset: held-out rows from `data.eval` when given, else `data.eval_fraction`
    of train held out by `seed` (none when 0)."""
    rows = rename_columns(load_rows(data.train, data.split), data.columns, data.train)
    if data.eval:
        held_out = rename_columns(load_rows(data.eval, data.split), data.columns, data.eval)
        return TaskRows(rows, held_out, data.train, data.eval)
    if data.eval_fraction <= 0:
        return TaskRows(rows, [], data.train, data.train)
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, int(len(rows) * data.eval_fraction))
    if n_eval >= len(rows):
        raise DataError(f"data.eval_fraction={data.eval_fraction} leaves no training rows",
                        source=data.train)
    held = set(order[:n_eval].tolist())
    return TaskRows([r for i, r in enumerate(rows) if i not in held],
                    [r for i, r in enumerate(rows) if i in held], data.train, data.train)


def load_preference_examples(cfg: RunConfig, tokenizer: Any
                             ) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Training and held-out preference pairs, read (see stage_rows) and tokenised."""
    rows = stage_rows(cfg, "preference")
    return (tokenize_preference(rows.train, tokenizer, cfg.data.max_length, rows.train_name),
            tokenize_preference(rows.held_out, tokenizer, cfg.data.max_length,
                                rows.held_out_name))


def stage_evaluator(cfg: RunConfig) -> Evaluator:
    """How held-out completions are judged: the task's evaluator for `data.train: embedded`,
    else exact match with the reference (white space stripped)."""
    if cfg.data.train == EMBEDDED:
        return load_task(cfg.task).is_correct
    return exact_match

"""Run tracking: one JSON object per logged step in metrics.jsonl, a tqdm progress bar, and
the trackers of `trainer.report_to` (see align.trackers) fed the same scalars."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from align.errors import OutputDirError
from align.trackers import Tracker

logger = logging.getLogger(__name__)

# Shown in the progress bar, when present, in this order.
BAR_KEYS = ("loss", "eval/loss", "reward", "rewards/accuracies", "accuracy", "kl")
COMPLETIONS_FILE = "completions.jsonl"


class MetricsLogger:
    """Appends metrics to `output_dir/metrics.jsonl` and drives the driver's progress bar.

    On resume, lines past the resumed step are dropped first, so a run killed after logging
    step N but before checkpointing it does not leave duplicates.
    """

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0,
                 desc: str = "train", show_progress: bool = True,
                 trackers: list[Tracker] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        _truncate_after(self.path, start_step)
        _truncate_after(self.output_dir / COMPLETIONS_FILE, start_step)
        self.file = self.path.open("a")
        self.trackers = trackers or []
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                        dynamic_ncols=True, disable=not show_progress)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log_scalars(step, scalars)
        shown = {k: f"{metrics[k]:.4g}" for k in BAR_KEYS if k in metrics}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved config, as hyperparameters of every tracker."""
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sampled completions with their rewards: appended to completions.jsonl (one object
        per sample, with its step) and shown as a table by every tracker."""
        with (self.output_dir / COMPLETIONS_FILE).open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        for tracker in self.trackers:
            tracker.log_table(step, "completions", rows)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file.

    A last line cut short (the process died while writing it) is skipped with a warning; a
    damaged line before it is an error naming the line.
    """
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n != lines[-1][0]:
                raise OutputDirError(f"{path}, line {n}: not a JSON object; the metrics file "
                                     "is damaged") from None
            logger.warning("%s, line %d: skipped an incomplete last line", path, n)
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past `step`, replacing the file atomically (a kill leaves old or new)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value

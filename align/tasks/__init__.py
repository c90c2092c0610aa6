"""Built-in verifiable tasks that need no download (the embedded default).

`data.train: embedded` resolves through `load_task(cfg.task)`: the task named by `task.name`,
built with the run's task settings. Each task implements `align.tasks.base.Task`.
"""

from __future__ import annotations

from align.config import TaskConfig
from align.errors import ConfigError
from align.tasks.arithmetic import ArithmeticTask
from align.tasks.base import RowKind, Task, TaskRows
from align.tasks.products import ProductsTask

TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "products": ProductsTask}


def load_task(cfg: TaskConfig) -> Task:
    """The task `cfg.name`, with the run's settings."""
    task = TASKS.get(cfg.name)
    if task is None:
        raise ConfigError(f"task.name must be one of {', '.join(TASKS)}; got {cfg.name!r}")
    return task(cfg)


__all__ = ["TASKS", "RowKind", "Task", "TaskRows", "load_task"]

"""Stand-ins for the `wandb` and `mlflow` packages that record what align asks of them.

Installed into `sys.modules` by a test (`install_fake_trackers`), they let the trackers run
without a network or the packages: each keeps its calls, and the MLflow one refuses to change
a logged parameter, as MLflow does.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from typing import Any

import pytest


class FakeWandbRun:
    def __init__(self, run_id: str) -> None:
        self.id = run_id
        self.logged: list[tuple[int, dict[str, Any]]] = []
        self.config = types.SimpleNamespace(update=lambda values, allow_val_change: None)
        self.finished = False

    def log(self, values: dict[str, Any], step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


class FakeWandb(types.ModuleType):
    """`wandb.init` records its arguments and the WANDB_MODE it saw; ids are wandb-1, -2..."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits: list[dict[str, Any]] = []
        self.runs: list[FakeWandbRun] = []
        self.Table = lambda columns, data: {"columns": columns, "data": data}

    def init(self, **kwargs: Any) -> FakeWandbRun:
        self.inits.append({**kwargs, "mode_seen": os.environ.get("WANDB_MODE")})
        run = FakeWandbRun(kwargs.get("id") or f"wandb-{len(self.inits)}")
        self.runs.append(run)
        return run


class FakeMlflow(types.ModuleType):
    """`mlflow.start_run` records its arguments; runs (ids mlflow-1, -2...) keep their params."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)
        self.starts: list[dict[str, Any]] = []
        self.experiments: list[str] = []
        self.params: dict[str, dict[str, str]] = {}
        self.active: str | None = None

    def set_tracking_uri(self, uri: str) -> None:
        self.uri = uri

    def set_experiment(self, name: str) -> None:
        self.experiments.append(name)

    def start_run(self, run_id: str | None = None, run_name: str | None = None):
        self.starts.append({"run_id": run_id, "run_name": run_name})
        run_id = run_id or f"mlflow-{len(self.starts)}"
        self.active = run_id
        params = self.params.setdefault(run_id, {})
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id),
                                     data=types.SimpleNamespace(params=dict(params)))

    def log_params(self, params: dict[str, str]) -> None:
        logged = self.params[self.active]
        changed = [k for k, v in params.items() if k in logged and logged[k] != v]
        if changed:
            raise ValueError(f"Changing param values is not allowed: {changed}")
        logged.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_table(self, data: dict[str, list], artifact_file: str) -> None: ...

    def end_run(self) -> None:
        self.active = None


def install_fake_trackers(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeWandb, FakeMlflow]:
    """Fresh fakes in `sys.modules` (undone after the test), with no tracker variables set."""
    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME",
                 "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    return wandb, mlflow

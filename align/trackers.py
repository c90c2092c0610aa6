"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

`trainer.report_to` lists the ones a run writes to; `metrics.jsonl` is always written. Each
tracker receives the resolved config once (as hyperparameters), every logged step's scalars,
and, for the RL stages, small tables of sampled completions. W&B and MLflow are optional
packages: asking for one that is not installed stops before training, naming what to install.
Both default to files on this machine (W&B offline mode unless `WANDB_MODE` says otherwise; an
MLflow file store under `output_dir/mlruns` unless `MLFLOW_TRACKING_URI` is set), so nothing
needs a network; sync or point them at a server with their own environment variables.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from align.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The package each tracker needs, and what to install for it.
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}


def check_trackers(names: list[str]) -> None:
    """Refuse unknown tracker names and trackers whose package is missing (key named)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"trainer.report_to: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKERS)}")
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"trainer.report_to lists {name!r} but the {module} package is "
                              f"not installed; run `{install}` or remove it from the list")


class Tracker:
    """What a tracker receives; every method is a no-op unless overridden."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    """Event files under `output_dir/tensorboard/` (torch's SummaryWriter)."""

    def __init__(self, output_dir: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flatten(config).items()}
        self.writer.add_hparams(flat, {}, run_name=".")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(r[h]) for h in header) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run in `output_dir/wandb/`, offline unless `WANDB_MODE` is set."""

    def __init__(self, output_dir: Path, run_name: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        self.wandb = wandb
        self.run = wandb.init(dir=str(output_dir), name=run_name, reinit=True)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run, in a file store under `output_dir/mlruns` unless MLFLOW_TRACKING_URI."""

    def __init__(self, output_dir: Path, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((Path(output_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment("align")
        self.run = mlflow.start_run(run_name=run_name)

    def log_config(self, config: dict[str, Any]) -> None:
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        self.mlflow.log_params(params)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        # MLflow metric names allow / but not every character; ours are letters, / and _.
        self.mlflow.log_metrics(scalars, step=step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]},
                                  artifact_file=f"{name}/step-{step}.json")

    def close(self) -> None:
        self.mlflow.end_run()


BUILDERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(names: list[str], output_dir: Path, run_name: str) -> list[Tracker]:
    """The trackers `names` (checked by check_trackers), writing for `output_dir`."""
    check_trackers(names)
    return [BUILDERS[name](Path(output_dir), run_name) for name in names]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"trainer": {"lr": 1e-4}}` -> `{"trainer.lr": 1e-4}` (lists kept whole)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")

"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

`trainer.report_to` lists the ones a run writes to; `metrics.jsonl` is always written. Each
tracker receives the resolved config once (as hyperparameters), every logged step's scalars,
and, for the RL stages, small tables of sampled completions. W&B and MLflow are optional
packages: asking for one that is not installed stops before training, naming what to install.
Both follow their own conventions: W&B runs in whatever mode `WANDB_MODE` (or `wandb login`)
gives it, under `tracking.wandb.project` / `entity` or `WANDB_PROJECT` / `WANDB_ENTITY`; MLflow
writes where `MLFLOW_TRACKING_URI` points, else to a file store in `output_dir/mlruns`. Their
run ids are saved in every checkpoint, so a resumed run continues the same W&B or MLflow run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import TrainingError
from align.tracker_names import check_trackers

if TYPE_CHECKING:
    from align.config import TrackingConfig

DEFAULT_PROJECT = "align"  # W&B project and MLflow experiment when nothing names one


class Tracker:
    """What a tracker receives; every method is a no-op unless overridden."""

    run_id: str | None = None  # the id a resumed run continues (W&B and MLflow runs have one)

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker(Tracker):
    """One event file per process under `output_dir/tensorboard/` (torch's SummaryWriter)."""

    def __init__(self, output_dir: Path, settings: TrackingConfig | None = None,
                 run_id: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log_config(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flatten(config).items()}
        # SummaryWriter.add_hparams would open a second writer, and so a second event file in
        # the same folder; the same summaries go through this writer instead.
        for summary in hparams(flat, {}):
            self.writer.file_writer.add_summary(summary)

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
    """A W&B run (local files in `output_dir/wandb/`); `run_id` continues an earlier one."""

    def __init__(self, output_dir: Path, settings: TrackingConfig,
                 run_id: str | None = None) -> None:
        import wandb

        self.wandb = wandb
        # No mode is set: WANDB_MODE (online, offline, disabled) stays the user's choice.
        project = settings.wandb.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        name = settings.run_name or os.environ.get("WANDB_NAME") or Path(output_dir).name
        try:
            # "allow": the run goes on if W&B knows it, and starts under that id if it does not
            # (an offline run never synced), so a resume never fails on the tracker alone.
            self.run = wandb.init(dir=str(output_dir), project=project,
                                  entity=settings.wandb.entity, name=name, id=run_id,
                                  resume="allow" if run_id else None, reinit=True)
        except Exception as exc:
            raise TrainingError(f"trainer.report_to: wandb could not start a run ({exc}); run "
                                "`wandb login`, or set WANDB_MODE=offline to keep the run on "
                                "this machine") from exc
        self.run_id = self.run.id

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
    """An MLflow run, in a file store under `output_dir/mlruns` unless MLFLOW_TRACKING_URI;
    `run_id` continues an earlier one."""

    def __init__(self, output_dir: Path, settings: TrackingConfig,
                 run_id: str | None = None) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((Path(output_dir) / "mlruns").resolve().as_uri())
        experiment = settings.mlflow.experiment
        if experiment is None and not (os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                       or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            experiment = DEFAULT_PROJECT  # else MLflow's own variables pick the experiment
        if experiment is not None:
            mlflow.set_experiment(experiment)
        name = settings.run_name or Path(output_dir).name
        try:
            self.run = (mlflow.start_run(run_id=run_id) if run_id
                        else mlflow.start_run(run_name=name))
        except Exception as exc:
            raise TrainingError(f"trainer.report_to: mlflow could not start "
                                f"{'run ' + run_id if run_id else 'a run'} ({exc})") from exc
        self.run_id = self.run.info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        # MLflow refuses to change a logged parameter: a resumed run logs only new keys.
        known = set(self.run.data.params)
        params = {k: str(v)[:500] for k, v in flatten(config).items() if k not in known}
        if params:
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


def open_trackers(names: list[str], output_dir: Path, settings: TrackingConfig,
                  run_ids: dict[str, str] | None = None) -> list[Tracker]:
    """The trackers `names` (checked by check_trackers), writing for `output_dir`.

    Args:
        names: `trainer.report_to`.
        output_dir: the run's folder.
        settings: `tracking` (project, entity, run name).
        run_ids: tracker name -> run id saved in the checkpoint being resumed (see `run_ids`).
    """
    check_trackers(names)
    ids = run_ids or {}
    return [BUILDERS[name](Path(output_dir), settings, ids.get(name)) for name in names]


def run_ids(names: list[str], trackers: list[Tracker]) -> dict[str, str]:
    """Tracker name -> run id of the trackers `open_trackers(names, ...)` returned that have
    one: what a checkpoint keeps so that its resume continues the same runs."""
    return {name: t.run_id for name, t in zip(names, trackers) if t.run_id is not None}


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

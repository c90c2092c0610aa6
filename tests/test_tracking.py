"""Experiment tracking: TensorBoard event files hold the scalars of metrics.jsonl (one file per
run); optional trackers that are not installed fail at start-up naming what to install; W&B and
MLflow (faked here: no network) follow their own conventions and a resume continues their runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from align.config import SFTConfig, load_config
from align.errors import ConfigError
from align.tracker_names import check_trackers
from align.trackers import TensorBoardTracker, open_trackers
from align.tracking import COMPLETIONS_FILE, MetricsLogger, read_metrics
from align.trainers.base import Trainer
from align.trainers.sft import SFTTrainer
from tests.conftest import tiny_sft_config
from tests.fake_trackers import install_fake_trackers


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_logger_feeds_tensorboard_the_jsonl_scalars(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=3, show_progress=False,
                           trackers=[TensorBoardTracker(tmp_path)])
    logger.log_config({"trainer": {"lr": 0.001}, "output_dir": str(tmp_path)})
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.001, "note": "text is not a scalar"})
    logger.log_completions(3, [{"prompt": "Q: 1+1=", "completion": " 2", "reward": 1.0}])
    logger.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]
    assert "note" not in scalars
    # One writer: the hyperparameters share the scalars' event file (no second, near-empty one).
    (events,) = (tmp_path / "tensorboard").iterdir()
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "_hparams_/experiment" in accumulator.PluginTagToContent("hparams")
    assert read_metrics(tmp_path / COMPLETIONS_FILE) == [
        {"step": 3, "prompt": "Q: 1+1=", "completion": " 2", "reward": 1.0}]


def test_unknown_or_missing_trackers_fail_at_start():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        load_config(SFTConfig, overrides=["trainer.report_to=[tensorbord]"])
    for name in ("wandb", "mlflow"):
        try:
            check_trackers([name])
        except ConfigError as err:  # not installed here: the message says what to install
            assert f"pip install {name}" in str(err)


@pytest.mark.slow
def test_a_run_writes_tensorboard_events_equal_to_metrics_jsonl(tmp_path, ray_local):
    cfg = tiny_sft_config(tmp_path, "trainer.max_steps=4", "trainer.log_every=1",
                          "trainer.report_to=[tensorboard]")
    SFTTrainer(cfg, show_progress=False).fit()
    run = tmp_path / "run"
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: one writer
    logged = read_metrics(run / "metrics.jsonl")
    scalars = tensorboard_scalars(run / "tensorboard")
    for key in ("loss", "grad_norm", "lr"):
        expected = [(m["step"], m[key]) for m in logged if key in m]
        assert len(expected) == 4
        assert scalars[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]


# --------------------------------------------------------------------------- W&B and MLflow


def test_wandb_and_mlflow_follow_their_own_conventions(tmp_path, monkeypatch):
    wandb, mlflow = install_fake_trackers(monkeypatch)
    cfg = load_config(SFTConfig, overrides=["trainer.report_to=[wandb, mlflow]",
                                            "tracking.wandb.project=arith",
                                            "tracking.wandb.entity=team",
                                            "tracking.run_name=first-try"])
    for tracker in open_trackers(["wandb", "mlflow"], tmp_path / "sft", cfg.tracking):
        tracker.close()
    # Nothing decides the mode for the user: W&B's own default (or WANDB_MODE) applies.
    assert wandb.inits[0]["mode_seen"] is None
    assert "WANDB_MODE" not in os.environ
    assert {k: wandb.inits[0][k] for k in ("project", "entity", "name", "id", "resume")} == {
        "project": "arith", "entity": "team", "name": "first-try", "id": None, "resume": None}
    assert mlflow.starts == [{"run_id": None, "run_name": "first-try"}]
    assert mlflow.experiments == ["align"]
    # Unset keys: the trackers' own variables, then align's names.
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "theirs")
    for tracker in open_trackers(["wandb", "mlflow"], tmp_path / "sft", SFTConfig().tracking):
        tracker.close()
    assert wandb.inits[1]["project"] == "from-env" and wandb.inits[1]["name"] == "sft"
    assert wandb.inits[1]["mode_seen"] == "offline"
    assert mlflow.experiments == ["align"]  # MLflow reads MLFLOW_EXPERIMENT_NAME itself


class RecordedGroup:
    """Workers that train nothing: what the driver loop asks of them, answered on disk."""

    def call(self, name: str, *args):
        if name in ("save", "save_checkpoint"):
            Path(args[0]).mkdir(parents=True, exist_ok=True)
            (Path(args[0]) / "weights").write_text(name)
        return ["node"]

    def shutdown(self) -> None: ...


class LoopOnly(Trainer):
    """The shared driver loop (fit, checkpoints, resume) around steps that only log a loss."""

    stage = "loop"

    def prepare_data(self) -> int:
        return 64

    def build_workers(self):
        return RecordedGroup()

    def train_step(self, step: int) -> dict[str, float]:
        return {"loss": 1.0 / (step + 1)}


def test_resume_continues_the_same_wandb_and_mlflow_runs(tmp_path, monkeypatch):
    wandb, mlflow = install_fake_trackers(monkeypatch)
    run = [f"output_dir={tmp_path / 'run'}", "trainer.save_every=1", "trainer.keep_last=5",
           "trainer.report_to=[wandb, mlflow]"]
    LoopOnly(load_config(SFTConfig, overrides=[*run, "trainer.max_steps=2"]),
             show_progress=False).fit()
    ids = {"wandb": "wandb-1", "mlflow": "mlflow-1"}
    state = json.loads((tmp_path / "run/checkpoints/step-2/trainer_state.json").read_text())
    assert state["trackers"] == ids
    LoopOnly(load_config(SFTConfig, overrides=[*run, "trainer.max_steps=3", "resume=auto"]),
             show_progress=False).fit()
    assert (wandb.inits[1]["id"], wandb.inits[1]["resume"]) == ("wandb-1", "allow")
    assert mlflow.starts[1] == {"run_id": "mlflow-1", "run_name": None}
    # The resumed run's changed settings (resume, max_steps) were not re-logged over the old.
    assert mlflow.params["mlflow-1"]["trainer.max_steps"] == "2"
    assert [step for step, _ in wandb.runs[1].logged] == [3]
    state = json.loads((tmp_path / "run/checkpoints/step-3/trainer_state.json").read_text())
    assert state["trackers"] == ids

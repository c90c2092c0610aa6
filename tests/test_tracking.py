"""Experiment tracking: TensorBoard event files hold the scalars of metrics.jsonl; optional
trackers that are not installed fail at start-up naming what to install."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from align.config import SFTConfig, load_config
from align.errors import ConfigError
from align.trackers import TensorBoardTracker, check_trackers
from align.tracking import COMPLETIONS_FILE, MetricsLogger, read_metrics
from align.trainers.sft import SFTTrainer
from tests.conftest import tiny_sft_config


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_logger_feeds_tensorboard_the_jsonl_scalars(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=3, show_progress=False,
                           trackers=[TensorBoardTracker(tmp_path, "t")])
    logger.log_config({"trainer": {"lr": 0.001}, "output_dir": str(tmp_path)})
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.001, "note": "text is not a scalar"})
    logger.log_completions(3, [{"prompt": "Q: 1+1=", "completion": " 2", "reward": 1.0}])
    logger.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]
    assert "note" not in scalars
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
    logged = read_metrics(run / "metrics.jsonl")
    scalars = tensorboard_scalars(run / "tensorboard")
    for key in ("loss", "grad_norm", "lr"):
        expected = [(m["step"], m[key]) for m in logged if key in m]
        assert len(expected) == 4
        assert scalars[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]

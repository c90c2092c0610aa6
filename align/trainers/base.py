"""The driver loop every stage shares: validate, prepare outputs, train, evaluate, save.

A stage subclasses `Trainer` and fills in its data, its step and its evaluation; the order of
events (inputs validated before any output is touched, atomic checkpoints, exact resume,
metrics, summary.json) is defined once, here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Generic, TypeVar

from align.checkpoint import (
    CheckpointManager,
    prepare_output_dir,
    publish_dir,
    read_state,
    resolve_resume,
)
from align.config import RunConfig, dump_config, to_dict
from align.distributed import PolicyWorker, WorkerGroup
from align.errors import TrainingError, column_aliases
from align.model_loading import check_lora_targets, load_tokenizer
from align.packed_forward import Packing, resolve_packing
from align.trackers import open_trackers, run_ids
from align.tracking import MetricsLogger
from align.trainers.batches import total_steps

ConfigT = TypeVar("ConfigT", bound=RunConfig)


class Trainer(Generic[ConfigT]):
    """Template for a stage, generic over its config schema. Subclasses set `stage` (the
    name it is registered under in `align.trainers.registry`) and implement the hooks below."""

    stage = "base"
    model_kind = "causal_lm"

    def __init__(self, cfg: ConfigT, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.show_progress = show_progress
        self.group: WorkerGroup | None = None
        # Roles besides the policy (critic, separate reference...), checkpointed in subfolders.
        self.extra_groups: dict[str, WorkerGroup] = {}
        # How the policy's batches are packed (None: padded); decided once its workers are up.
        self.packing: Packing | None = None
        # Rows prepare_data skipped as unusable, as metrics (`data/skipped/<reason>`); they go
        # to metrics.jsonl (step 0) and summary.json.
        self.data_metrics: dict[str, int] = {}
        # W&B / MLflow run ids, kept in checkpoints so that a resume continues the same runs.
        self.tracker_ids: dict[str, str] = {}

    # ---------------------------------------------------------------- hooks

    def prepare_data(self) -> int:
        """Read, validate and tokenise every input; return the number of training examples."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """Run 0-based optimizer step `step` on the workers; return its metrics."""
        raise NotImplementedError

    def evaluate(self, final: bool) -> dict[str, float]:
        """Held-out metrics (keys prefixed `eval/`); `final` marks the end-of-run pass."""
        return {}

    def count_steps(self, num_examples: int) -> int:
        """Steps of the run: trainer.max_steps, or trainer.epochs over the examples."""
        return total_steps(self.cfg.trainer, num_examples)

    def optimizer_steps(self) -> int:
        """Optimizer steps the LR schedule spans (PPO takes several per iteration)."""
        return self.total_steps

    def samples_per_step(self) -> int:
        return self.cfg.trainer.global_batch_size

    def needs_reference(self) -> bool:
        """Whether the policy workers hold a frozen reference (`Policy.reference_view`)."""
        return False

    def write_derived(self, out: Path) -> None:
        """Write files the run derived from its inputs (e.g. mined pairs) into its folder."""

    def extra_state(self) -> dict[str, Any]:
        """Driver-side state a resume needs besides the workers' (e.g. a KL controller)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Run the stage end to end; returns (and writes) the summary.

        Whatever ends the run (an error, Ctrl-C), every Ray actor group it started is
        released in `finally` (see `close`).
        """
        cfg = self.cfg
        started = time.time()
        try:
            self.tokenizer = load_tokenizer(cfg.model)
            check_lora_targets(cfg.model, self.tokenizer, self.model_kind)
            with column_aliases(cfg.data.columns):  # errors name the user's columns
                num_examples = self.prepare_data()
            self.total_steps = self.count_steps(num_examples)
            resume_from = resolve_resume(cfg.output_dir, cfg.resume)
            out = prepare_output_dir(cfg.output_dir, cfg.overwrite,
                                     resuming=resume_from is not None)
            self.output_dir = out
            checkpoints = CheckpointManager(out, cfg.trainer.keep_last)
            self.group = self.build_workers()
            # Written once the workers are up: a model refused at start-up (packing that would
            # leak) leaves the folder empty, so the corrected rerun needs no overwrite=true.
            dump_config(cfg, out / "config.yaml")
            self.write_derived(out)
            self._write_placement(out)
            step = 0
            if resume_from is not None:
                self.group.call("load_checkpoint", str(resume_from))
                for role, group in self.extra_groups.items():
                    group.call("load_checkpoint", str(resume_from / role))
                state = read_state(resume_from)
                step = state["step"]
                self.load_extra_state(state.get("extra", {}))
                self.tracker_ids = state.get("trackers", {})
            train_seconds, trained = self._loop(step, checkpoints)
            final_metrics = self.evaluate(final=True)
            self._save_final(out)
            summary = {
                "stage": self.stage, "steps": self.total_steps,
                "wall_seconds": round(time.time() - started, 2),
                "samples_per_second": round(trained / train_seconds, 2) if train_seconds else 0.0,
                **self.data_metrics, **final_metrics,
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            return summary
        finally:
            self.close()

    def close(self) -> None:
        """Shut down every actor group of the run and free its placement group (safe to call
        twice). Stages that hold more (reward-model actors) extend it."""
        for group in [self.group, *self.extra_groups.values()]:
            if group is not None:
                group.shutdown()

    def build_workers(self) -> WorkerGroup:
        cfg = self.cfg
        group = WorkerGroup(PolicyWorker, cfg.distributed, role="policy")
        self.group = group  # released by close() even if set-up is interrupted
        group.call("setup", model_cfg=cfg.model, trainer_cfg=cfg.trainer,
                   dist_cfg=cfg.distributed, total_steps=self.optimizer_steps(),
                   kind=self.model_kind, reference=self.needs_reference())
        self.packing = self.packing_of(group, "policy")
        return group

    def packing_of(self, group: WorkerGroup, role: str) -> Packing | None:
        """How `group`'s model packs, checked on the loaded model (see
        `align.packed_forward`); shuts the group down if packing was required and would leak."""
        if self.cfg.data.packing is False:
            return None
        try:
            return resolve_packing(self.cfg.data, group.call("check_packing")[0], role)
        except BaseException:
            group.shutdown()
            raise

    def _write_placement(self, out: Path) -> None:
        """placement.json: the Ray node of every rank of every role."""
        groups = {"policy": self.group, **self.extra_groups}
        placement = {role: group.call("node_id") for role, group in groups.items()}
        (out / "placement.json").write_text(json.dumps(placement, indent=1) + "\n")

    def _loop(self, step: int, checkpoints: CheckpointManager) -> tuple[float, int]:
        cfg = self.cfg.trainer
        trackers = open_trackers(cfg.report_to, self.output_dir, self.cfg.tracking,
                                 self.tracker_ids)
        self.tracker_ids = run_ids(cfg.report_to, trackers)
        logger = MetricsLogger(self.output_dir, self.total_steps, step, desc=self.stage,
                               show_progress=self.show_progress, trackers=trackers)
        logger.log_config(to_dict(self.cfg))
        if step == 0 and self.data_metrics:  # a resumed run keeps the line it wrote first
            logger.log(0, self.data_metrics)
        self.logger = logger
        seconds, samples = 0.0, 0
        try:
            while step < self.total_steps:
                tick = time.perf_counter()
                metrics = self.train_step(step)
                elapsed = time.perf_counter() - tick
                step += 1
                _check_finite(metrics, step)
                seconds += elapsed
                samples += self.samples_per_step()
                metrics["step_seconds"] = elapsed
                if step % cfg.log_every == 0 or step == self.total_steps:
                    logger.log(step, metrics)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                    logger.log(step, self.evaluate(final=False))
                if (cfg.save_every and step % cfg.save_every == 0) or step == self.total_steps:
                    self._save_checkpoint(checkpoints, step)
                logger.advance()
        finally:
            logger.close()
        return seconds, samples

    def _save_checkpoint(self, checkpoints: CheckpointManager, step: int) -> None:
        def write(tmp: Path) -> None:
            self.group.call("save_checkpoint", str(tmp))
            for role, group in self.extra_groups.items():
                group.call("save_checkpoint", str(tmp / role))

        checkpoints.save(step, write, {"extra": self.extra_state(),
                                       "trackers": self.tracker_ids})

    def _save_final(self, out: Path) -> None:
        """final/ in Hugging Face format, published by rename so it is never half-written."""
        tmp = out / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.group.call("save", str(tmp))
        publish_dir(tmp, out / "final")


# Metrics that must be finite for training to go on: the loss of every stage, PPO's policy
# and value losses, the gradient norm, and the reward.
FINITE_METRICS = ("loss", "policy_loss", "value_loss", "grad_norm", "reward")


def _check_finite(metrics: dict[str, float], step: int) -> None:
    for key in FINITE_METRICS:
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            raise TrainingError(f"step {step}: {key} is {value}; stopping before a checkpoint "
                                "is written from bad state (lower trainer.lr or check the data)")

"""Exact resume after SIGKILL, and a kill during a checkpoint write.

SFT, the reward model, DPO and PPO with a critic are killed and resumed: every stage resumes
through the same `Trainer` loop and checkpoint code, which these cover with and without a
reference model and an extra role.

A run killed by SIGKILL (injected with ALIGN_FAULT at a checkpoint) and resumed with
`resume=auto` (or into another run with `resume=PATH`) must log the same per-step metrics as an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align.checkpoint import FAULT_ENV, CheckpointManager
from align.config import dump_config
from align.tasks import load_task
from align.tracking import read_metrics
from align.trainers.registry import run_stage
from tests.conftest import (
    full_only,
    tiny_dpo_config,
    tiny_ppo_config,
    tiny_rm_config,
    tiny_sft_config,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_cli(stage: str, config: Path, *overrides: str, fault: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "align.cli", stage, str(config), "--quiet",
                           *overrides], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def comparable(run: Path) -> list[dict]:
    """Per-step metrics without wall-clock timings."""
    return [{k: v for k, v in m.items() if not k.startswith("time/") and k != "step_seconds"}
            for m in read_metrics(run / "metrics.jsonl")]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x.keys(), y.keys())
        for key in x:
            if isinstance(x[key], float):
                assert math.isclose(x[key], y[key], rel_tol=1e-6, abs_tol=1e-6), (x["step"], key)
            else:
                assert x[key] == y[key], (x["step"], key)


def interrupted_then_resumed(stage: str, cfg, tmp_path: Path, fault: str) -> Path:
    config = tmp_path / f"{stage}.yaml"
    cfg.output_dir = str(tmp_path / "interrupted")
    dump_config(cfg, config)
    killed = run_cli(stage, config, fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(stage, config, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return Path(cfg.output_dir)


def uninterrupted(stage: str, cfg, tmp_path: Path) -> Path:
    cfg.output_dir = str(tmp_path / "straight")
    run_stage(stage, cfg, show_progress=False)
    return Path(cfg.output_dir)


@full_only  # the PPO kill-and-resume below runs in `make test`
def test_sft_kill_during_checkpoint_write_resumes_exactly(tmp_path, ray_local):
    """On a data file: the killed run prepares it into the cache, the resumed one reads it from
    there, the straight run prepares it with the cache off, and all see the same steps."""
    rows = load_task(tiny_sft_config(tmp_path).task).rows("sft").train
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = tiny_sft_config(tmp_path, "trainer.max_steps=6", "trainer.save_every=3",
                          "eval.exact_match=false", f"data.train={data}",
                          "data.eval_fraction=0.02", f"data.cache_dir={tmp_path / 'cache'}")
    straight_cfg = tiny_sft_config(tmp_path, "trainer.max_steps=6", "trainer.save_every=3",
                                   "eval.exact_match=false", f"data.train={data}",
                                   "data.eval_fraction=0.02", "data.cache=false")
    straight = uninterrupted("sft", straight_cfg, tmp_path)
    config = tmp_path / "sft.yaml"
    cfg.output_dir = str(tmp_path / "interrupted")
    dump_config(cfg, config)
    killed = run_cli("sft", config, fault="kill-during-checkpoint:6")
    assert killed.returncode == -9
    run = Path(cfg.output_dir)
    # The half-written checkpoint is not taken for a complete one; the previous one is intact.
    assert (run / "checkpoints" / ".tmp-step-6").is_dir()
    assert CheckpointManager(run, 2).latest() == run / "checkpoints" / "step-3"
    resumed = run_cli("sft", config, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_metrics(comparable(straight), comparable(run))
    assert not (run / "checkpoints" / ".tmp-step-6").exists()
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("sft-")]) == 1
    # resume=PATH: another run continues from the straight run's step-3 (not its newest).
    cfg.output_dir, cfg.resume = str(tmp_path / "from-path"), str(
        straight / "checkpoints" / "step-3")
    run_stage("sft", cfg, show_progress=False)
    assert_same_metrics(comparable(straight)[3:], comparable(tmp_path / "from-path"))


def test_ppo_resume_after_sigkill_is_exact(tmp_path, ray_local):
    """gae: the critic's weights and optimizer, the adaptive KL coefficient and a normalised
    reward's running statistics resume too."""
    letters = Path(__file__).parent / "trainers" / "letter_reward.py"

    def config():
        return tiny_ppo_config(tmp_path, "algorithm.estimator=gae",
                               "trainer.max_steps=6", "trainer.save_every=3",
                               "algorithm.adaptive_kl=true", "eval.max_samples=0",
                               f"rewards=[{{spec: '{letters}:lowercase_share', normalize: true, "
                               "normalize_window: 64}]")
    straight = uninterrupted("ppo", config(), tmp_path)
    resumed = interrupted_then_resumed("ppo", config(), tmp_path, "kill-after-checkpoint:3")
    assert_same_metrics(comparable(straight), comparable(resumed))
    assert "rewards/lowercase_share/shaped_mean" in (straight / "metrics.jsonl").read_text()


@full_only  # the SFT and PPO resumes above run in `make test`
def test_dpo_resume_after_sigkill_is_exact(tmp_path, ray_local):
    def config():
        return tiny_dpo_config(tmp_path, "trainer.max_steps=6", "trainer.save_every=3",
                               "eval.exact_match=false")
    straight = uninterrupted("dpo", config(), tmp_path)
    resumed = interrupted_then_resumed("dpo", config(), tmp_path, "kill-after-checkpoint:3")
    assert_same_metrics(comparable(straight), comparable(resumed))


@full_only  # the SFT and PPO resumes above run in `make test`
def test_rm_resume_after_sigkill_is_exact(tmp_path, ray_local):
    def config():
        return tiny_rm_config(tmp_path, "trainer.max_steps=6", "trainer.save_every=3")
    straight = uninterrupted("rm", config(), tmp_path)
    resumed = interrupted_then_resumed("rm", config(), tmp_path, "kill-after-checkpoint:3")
    assert_same_metrics(comparable(straight), comparable(resumed))


def test_resume_refuses_a_checkpoint_that_runs_code(tmp_path, ray_local):
    """A pickle payload as the model states of `step-9` is refused on resume, never run."""
    from align.checkpoint import prepare_output_dir
    from align.errors import CheckpointError
    from tests.test_checkpoint import save_payload

    cfg = tiny_sft_config(tmp_path, "resume=auto", "eval.exact_match=false")
    out = prepare_output_dir(cfg.output_dir, overwrite=False, resuming=False)
    marker = tmp_path / "payload-ran"
    CheckpointManager(out, 2).save(
        9, lambda tmp: save_payload(tmp / "engine" / "mp_rank_00_model_states.pt", marker),
        {"extra": {}})
    with pytest.raises(CheckpointError, match=r"step-9/engine/mp_rank_00_model_states.pt: it "
                                              r"needs io.open"):
        run_stage("sft", cfg, show_progress=False)
    assert not marker.exists()

"""Checkpoints: safe loading, the manifest, fallback, keep_last, re-saving; `overwrite=true`
deleting only align's own outputs; a torn metrics line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from align.checkpoint import (
    MANIFEST_FILE,
    RUN_MARKER,
    CheckpointManager,
    SafeCheckpointEngine,
    clear_run_outputs,
    prepare_output_dir,
    resolve_resume,
    safe_torch_load,
)
from align.cli import main
from align.errors import CheckpointError, OutputDirError
from align.tracking import read_metrics
from tests.test_bad_inputs import TINY_MODEL, folder_digest


class Payload:
    """Unpickling this creates `marker`: proof that loading a file ran its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def save_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": Payload(marker)}, path)


# --------------------------------------------------------------------------- safe loading


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    file = tmp_path / "engine" / "mp_rank_00_model_states.pt"
    save_payload(file, marker)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: it needs "
                                              r"io.open"):
        SafeCheckpointEngine(object()).load(str(file))
    assert not marker.exists()


def test_deepspeed_types_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"w": torch.ones(2), "scaler": LossScaler(2.0),
             "dyn": DynamicLossScaler(2.0, 10, 1.0, 2, False),
             "stage": ZeroStageEnum.gradients, "frag": fragment_address(numel=2, start=0)}
    torch.save(state, tmp_path / "s.pt")
    back = safe_torch_load(tmp_path / "s.pt")
    assert back["stage"] is ZeroStageEnum.gradients and back["scaler"].cur_scale == 2.0
    assert back["frag"].numel == 2 and torch.equal(back["w"], state["w"])
    (tmp_path / "torn.pt").write_bytes((tmp_path / "s.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        safe_torch_load(tmp_path / "torn.pt")


# --------------------------------------------------------------------------- manifest


def save(manager: CheckpointManager, step: int, payload: bytes = b"w" * 32) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "engine").mkdir()
        (tmp / "engine" / "weights.bin").write_bytes(payload)

    return manager.save(step, write, {"extra": {}})


def test_incomplete_checkpoints_fall_back_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=5)
    good, torn, truncated = save(manager, 3), save(manager, 9), save(manager, 12)
    only_state = manager.root / "step-6"  # a step folder holding only trainer_state.json
    only_state.mkdir()
    (only_state / "trainer_state.json").write_text('{"step": 6}')
    (torn / "engine" / "weights.bin").write_bytes(b"w" * 7)
    (truncated / "trainer_state.json").write_text('{"st')
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path, "auto") == good
    assert "step-6 is incomplete: it has no manifest.json" in caplog.text
    assert "weights.bin has 7 bytes where the manifest says 32" in caplog.text
    assert "trainer_state.json has 4 bytes" in caplog.text
    assert "resuming from step-3" in caplog.text
    with pytest.raises(OutputDirError, match="not a complete checkpoint: it has no manifest"):
        resolve_resume(tmp_path, str(only_state))


def test_resume_auto_with_overwrite_never_wipes_an_unfinished_checkpoint(tmp_path, capsys):
    """The only checkpoint is unfinished: `resume=auto overwrite=true` exits 2, changes nothing."""
    out = tmp_path / "out"
    prepare_output_dir(out, overwrite=False, resuming=False)
    step = out / "checkpoints" / "step-6"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text('{"step": 6}')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {out}\n")
    before = folder_digest(out)
    code = main(["sft", str(config), "--quiet", *TINY_MODEL, "resume=auto", "overwrite=true"])
    err = capsys.readouterr().err
    assert code == 2 and "none is complete" in err and "nothing was changed" in err, err
    assert folder_digest(out) == before


def test_keep_last_ranks_by_write_time_not_step_number(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    stale = save(manager, 9)  # left by an abandoned run
    fresh = save(manager, 3)
    assert fresh.is_dir() and not stale.exists()
    assert manager.latest() == fresh
    manager.keep_last = 2
    assert save(manager, 4).is_dir() and fresh.is_dir()


def test_resaving_a_step_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path,
                                                                           monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=2)
    first = save(manager, 3, b"old")

    def power_cut(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", power_cut)  # the new folder never gets in place
    with pytest.raises(OSError, match="power cut"):
        save(manager, 3, b"new")
    monkeypatch.undo()
    assert manager.latest() == first  # the old one is taken back
    assert (first / "engine" / "weights.bin").read_bytes() == b"old"
    save(manager, 3, b"new")
    assert (first / "engine" / "weights.bin").read_bytes() == b"new"
    assert not (manager.root / ".old-step-3").exists()


def test_torn_last_metrics_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(OutputDirError, match="line 2"):
        read_metrics(path)


# --------------------------------------------------------------------------- overwrite


def old_run(folder: Path) -> Path:
    """A folder as a previous run left it, plus a file of the user's."""
    prepare_output_dir(folder, overwrite=False, resuming=False)
    (folder / "config.yaml").write_text("x: 1\n")
    save(CheckpointManager(folder, 1), 1)
    (folder / "notes.txt").write_text("mine")
    return folder


def test_overwrite_deletes_only_align_outputs(tmp_path):
    out = old_run(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.bin").write_text("data")
    (out / "final").symlink_to(elsewhere)
    prepare_output_dir(out, overwrite=True, resuming=False)
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER, "notes.txt"]
    assert (elsewhere / "keep.bin").read_text() == "data"  # a link is removed, not followed


def test_overwrite_refuses_a_folder_align_did_not_create(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("mine")
    with pytest.raises(OutputDirError, match="was not created by align"):
        prepare_output_dir(foreign, overwrite=True, resuming=False)
    assert (foreign / "config.yaml").read_text() == "mine"


@pytest.mark.parametrize("where", ["root", "home", "parent of home", "cwd", "parent of cwd"])
def test_overwrite_refuses_root_home_cwd_and_parents(tmp_path, monkeypatch, where):
    home, cwd = old_run(tmp_path / "home"), old_run(tmp_path / "work" / "project")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    target = {"root": Path("/"), "home": home, "parent of home": tmp_path, "cwd": Path("."),
              "parent of cwd": Path("..")}[where]
    (target / RUN_MARKER).write_text("{}")  # even a folder marked as align's
    before = folder_digest(tmp_path)
    with pytest.raises(OutputDirError, match="root, the home folder, the current directory"):
        clear_run_outputs(target)
    assert folder_digest(tmp_path) == before


def test_cli_overwrite_of_the_current_directory_exits_2(tmp_path, monkeypatch, capsys):
    cwd = old_run(tmp_path / "here")
    config = tmp_path / "run.yaml"
    config.write_text("trainer: {max_steps: 1}\n")
    monkeypatch.chdir(cwd)
    before = folder_digest(cwd)
    code = main(["sft", str(config), "--quiet", *TINY_MODEL, "output_dir=.", "overwrite=true"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to delete anything" in err, err
    assert folder_digest(cwd) == before


def test_manifest_lists_every_file(tmp_path):
    path = save(CheckpointManager(tmp_path, 1), 2)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["files"] == {"engine/weights.bin": 32, "trainer_state.json":
                                 (path / "trainer_state.json").stat().st_size}

"""Output folders, atomic checkpoints, resume, and loading checkpoints without running code.

A checkpoint is written into `checkpoints/.tmp-step-N/`, listed in a `manifest.json` (every
file and its size, written last), fsynced, and only then renamed to `checkpoints/step-N/`. A
folder counts as a checkpoint only when its manifest matches what is on disk, so a run killed
mid-write, or a file torn or lost later, is never taken for a complete checkpoint: `resume=auto`
falls back to the newest one that is complete, with a warning.

`overwrite=true` deletes only what a run of align wrote (`RUN_OUTPUTS`) in a folder that align
created (it holds the `RUN_MARKER` file), and never in the filesystem root, the home folder, the
current directory or a parent of it.

DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, which runs whatever
code a file names. `SafeCheckpointEngine` replaces that with `weights_only=True` and allows only
the few plain DeepSpeed types its checkpoints hold; a file that needs anything else is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import CheckpointError, OutputDirError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RUN_MARKER = ".align-run"  # written into every output_dir align creates or takes over
# What a run writes into output_dir; `overwrite=true` deletes these names and nothing else.
RUN_OUTPUTS = ("checkpoints", "final", ".tmp-final", ".old-final", "config.yaml",
               "metrics.jsonl", "metrics.jsonl.tmp", "summary.json", "placement.json",
               "eval_samples.jsonl", "reference_logps")
# Fault injection for the reliability tests: `kill-during-checkpoint:N` SIGKILLs the process
# after checkpoint N's files are written but before it is published; `kill-after-checkpoint:N`
# right after it is published. Unset in normal runs.
FAULT_ENV = "ALIGN_FAULT"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Besides tensors and containers, DeepSpeed 0.19 checkpoints hold only these plain types
# (measured for ZeRO 0-3, LoRA and optimizer offload); each is rebuilt from its fields alone.
_DEEPSPEED_TYPES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


# --------------------------------------------------------------------------- output folders


def prepare_output_dir(output_dir: str | Path, overwrite: bool, resuming: bool) -> Path:
    """Create `output_dir`, refusing to reuse one that holds a previous run.

    With `overwrite`, a previous run's outputs are deleted first (see `clear_run_outputs`).
    Call this only after every input has been validated, so bad input never touches outputs.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} exists and is not a folder")
    # A folder holding only the marker is one whose run stopped before writing anything.
    if out.is_dir() and any(p.name != RUN_MARKER for p in out.iterdir()) and not resuming:
        if not overwrite:
            raise OutputDirError(
                f"output_dir {out} is not empty (a previous run?). Pass resume=auto to continue "
                f"it, overwrite=true to replace it, or choose another output_dir=...")
        clear_run_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RUN_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "align"}) + "\n")
    return out


def clear_run_outputs(output_dir: str | Path) -> None:
    """Delete what an earlier run of align wrote into `output_dir`, and nothing else.

    Raises:
        OutputDirError: the folder is the filesystem root, the home folder, the current
            directory or a parent of it, or align did not create it (no `RUN_MARKER`).
    """
    target = Path(output_dir).resolve()
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if home.is_relative_to(target) or cwd.is_relative_to(target):
        raise OutputDirError(
            f"overwrite=true: refusing to delete anything in output_dir {target}: it is the "
            "filesystem root, the home folder, the current directory or a parent of one; "
            "choose a folder of its own, e.g. output_dir=runs/NAME")
    if not (target / RUN_MARKER).is_file():
        raise OutputDirError(
            f"overwrite=true: output_dir {target} was not created by align (it has no "
            f"{RUN_MARKER} file), so nothing in it is deleted; empty it yourself or choose "
            "another output_dir=...")
    for name in RUN_OUTPUTS:
        _remove(target / name)
    kept = sorted(p.name for p in target.iterdir() if p.name != RUN_MARKER)
    if kept:
        logger.warning("output_dir %s: kept %d entries align did not write: %s", target,
                       len(kept), ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else ""))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link is removed, never what it points to
    elif path.is_dir():
        shutil.rmtree(path)


# --------------------------------------------------------------------------- durability


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root`), so a rename publishes data
    that is on disk, not only in the page cache."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """fsync a folder, making the renames and creations inside it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older `final` only once the new
    one is in place: the old one is set aside as `.old-<name>` and deleted last."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json_durably(path: Path, value: Any) -> None:
    with path.open("w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- checkpoints


class CheckpointManager:
    """Writes `output_dir/checkpoints/step-N` atomically and keeps the newest `keep_last`.

    "Newest" means most recently written (the manifest's `saved_at_ns`), not the highest step:
    stale higher-numbered folders left by an abandoned run never outrank a fresh checkpoint.
    """

    def __init__(self, output_dir: str | Path, keep_last: int) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def save(self, step: int, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """Run `write(tmp_dir)` (model/optimizer files), add `state` and the manifest, then
        publish the folder as step-N."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step}"
        final = self.root / f"step-{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        write_json_durably(tmp / STATE_FILE, {"step": step, **state})
        files = {str(p.relative_to(tmp)): p.stat().st_size
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        # Written last: a folder whose manifest matches its files is complete.
        write_json_durably(tmp / MANIFEST_FILE, {"step": step, "saved_at_ns": time.time_ns(),
                                                 "files": files})
        _maybe_fault("kill-during-checkpoint", step)
        publish_dir(tmp, final)
        self._prune(final)
        _maybe_fault("kill-after-checkpoint", step)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (by when they were written)."""
        found = []
        for path in self._step_dirs():
            if verify_checkpoint(path) is None:
                manifest = json.loads((path / MANIFEST_FILE).read_text())
                found.append((manifest["saved_at_ns"], _step_of(path), path))
        return [path for *_, path in sorted(found)]

    def incomplete(self) -> list[tuple[Path, str]]:
        """Checkpoint folders that are not complete, with the reason; unpublished
        `.tmp-step-N` folders included."""
        broken = [(p, reason) for p in self._step_dirs()
                  if (reason := verify_checkpoint(p)) is not None]
        if self.root.is_dir():
            broken += [(p, "it was never published (the run stopped while writing it)")
                       for p in sorted(self.root.glob(".tmp-step-*"))]
        return broken

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        for old in self.root.glob(".old-step-*"):  # a re-save stopped between its renames
            current = self.root / old.name.removeprefix(".old-")
            if not current.exists():
                os.rename(old, current)
        return sorted((p for p in self.root.iterdir() if _STEP_DIR.match(p.name)),
                      key=_step_of)

    def _prune(self, fresh: Path) -> None:
        # Incomplete step folders go too: a complete checkpoint now exists to resume from.
        keep = {fresh, *self.complete()[-self.keep_last:]}
        for path in self._step_dirs():
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for leftover in [*self.root.glob(".tmp-step-*"), *self.root.glob(".old-step-*")]:
            shutil.rmtree(leftover, ignore_errors=True)


def verify_checkpoint(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
        int(manifest["saved_at_ns"])
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (unfinished, or written by an older align)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is unreadable"
    if not isinstance(files, dict):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes where the manifest says {size}"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"its {STATE_FILE} is unreadable"
    return None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one (`auto`), or a path.

    `auto` skips incomplete checkpoints with a warning. When checkpoints exist but none is
    complete it raises rather than start over, so `resume=auto overwrite=true` never deletes
    a run whose checkpoint is damaged.
    """
    if not resume:
        return None
    if resume == "auto":
        manager = CheckpointManager(output_dir, keep_last=1)
        latest, broken = manager.latest(), manager.incomplete()
        for path, reason in broken:
            fallback = f"resuming from {latest.name}" if latest else "no complete checkpoint"
            logger.warning("checkpoint %s is incomplete: %s; %s", path, reason, fallback)
        if latest is None and broken:
            names = "; ".join(f"{p.name}: {reason}" for p, reason in broken)
            raise OutputDirError(
                f"resume=auto: {output_dir} holds checkpoints but none is complete ({names}); "
                "nothing was changed. Resume from another checkpoint with resume=PATH, or "
                "start over with overwrite=true and no resume")
        return latest
    path = Path(resume)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise OutputDirError(f"resume={resume}: not a complete checkpoint: {reason}")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _maybe_fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- safe loading


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)`, allowing DeepSpeed's plain checkpoint types.

    Raises:
        CheckpointError: the file needs any other type or function (it could run code), or it
            cannot be read.
    """
    import importlib

    import torch

    allowed = [getattr(importlib.import_module(module), name)
               for module, name in _DEEPSPEED_TYPES]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        needed = re.search(r"GLOBAL (\S+)", str(err))
        what = needed.group(1) if needed else "a construct outside plain tensors and values"
        raise CheckpointError(
            f"refused to load {path}: it needs {what}, which no checkpoint align writes "
            "holds, and loading it could run code. Resume only from checkpoints you trust "
            "(see docs/reliability.md)") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with `load` replaced by `safe_torch_load`.

    Every other method (save, commit, ...) is the wrapped engine's, so files are written as
    before. `Policy.load_checkpoint` installs it on its engine.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)

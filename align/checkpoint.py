"""Output folders, atomic checkpoints and resume.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `checkpoints/step-N/`
only once complete (its `trainer_state.json` is written last), so a run killed mid-write leaves
the previous checkpoint intact and never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import OutputDirError

STATE_FILE = "trainer_state.json"
# Fault injection for the reliability tests: `kill-during-checkpoint:N` SIGKILLs the process
# after checkpoint N's files are written but before it is published; `kill-after-checkpoint:N`
# right after it is published. Unset in normal runs.
FAULT_ENV = "ALIGN_FAULT"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def prepare_output_dir(output_dir: str | Path, overwrite: bool, resuming: bool) -> Path:
    """Create `output_dir`, refusing to reuse one that holds a previous run.

    Call this only after every input has been validated, so bad input never touches outputs.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not resuming:
        if not overwrite:
            raise OutputDirError(
                f"output_dir {out} is not empty (a previous run?). Pass resume=auto to continue "
                f"it, overwrite=true to replace it, or choose another output_dir=...")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class CheckpointManager:
    """Writes `output_dir/checkpoints/step-N` atomically and keeps the newest `keep_last`."""

    def __init__(self, output_dir: str | Path, keep_last: int) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def save(self, step: int, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """Run `write(tmp_dir)` (model/optimizer files), add `state`, then publish as step-N."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step}"
        final = self.root / f"step-{step}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        state_path = tmp / STATE_FILE
        with state_path.open("w") as f:
            json.dump({"step": step, **state}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _maybe_fault("kill-during-checkpoint", step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        _maybe_fault("kill-after-checkpoint", step)
        return final

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one (`auto`), or a path."""
    if not resume:
        return None
    if resume == "auto":
        return CheckpointManager(output_dir, keep_last=1).latest()
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise OutputDirError(f"resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def _maybe_fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)

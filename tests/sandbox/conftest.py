"""Fixtures of the sandbox tests: executors whose processes can be found again, host folders
outside the sandbox's private /tmp, and settings reset around each test."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from align.sandbox import LocalExecutor, SandboxError, configure
from align.sandbox.sandbox import ENV_VAR

MARK = "ALIGN_SANDBOX_TEST_MARK"  # a variable every process of a marked execution inherits


def _can_sandbox() -> str | None:
    try:
        LocalExecutor().run("pass")
    except SandboxError as err:
        return str(err)
    return None


_UNAVAILABLE = _can_sandbox() if os.name == "posix" else "not Linux"
needs_namespaces = pytest.mark.skipif(
    _UNAVAILABLE is not None, reason=f"this machine cannot make the sandbox: {_UNAVAILABLE}")


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    """No sandbox settings from an earlier test or run leak in, or out."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    configure(None)
    yield
    configure(None)


def processes_marked(mark: str) -> list[int]:
    """Live processes (zombies aside) whose environment holds ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return found


@pytest.fixture()
def marked():
    """Factory: a LocalExecutor whose executions carry a fresh mark, and the mark."""
    def make(**options) -> tuple[LocalExecutor, str]:
        mark = uuid.uuid4().hex
        env = {**options.pop("env", {}), MARK: mark}
        return LocalExecutor(env=env, **options), mark

    return make


@pytest.fixture()
def host_folder():
    """A world-writable folder on the host outside /tmp (which the sandbox replaces)."""
    base = "/run" if os.access("/run", os.W_OK) else str(Path.home())
    path = Path(tempfile.mkdtemp(prefix="align-sandbox-test-", dir=base))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")

"""Fixtures of the sandbox tests: executors whose processes can be found again, host folders
outside the sandbox's private /tmp, and settings reset around each test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from align.sandbox import LocalExecutor, SandboxError, configure
from align.sandbox.sandbox import ENV_VAR

MARK = "ALIGN_SANDBOX_TEST_MARK"  # a variable every process of a marked execution inherits


def _machine_refuses_namespaces() -> str | None:
    """Why this machine cannot make the sandbox's namespaces (None: it can), asked of the
    kernel directly so that a broken sandbox fails its tests rather than skipping them."""
    if os.name != "posix" or not Path("/proc/self/ns").is_dir():
        return "not Linux"
    flags = 0x00020000 | 0x20000000 | 0x40000000  # mount, PID, network
    if os.geteuid() != 0:
        flags |= 0x10000000  # a user namespace
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import ctypes, os; libc = ctypes.CDLL(None, "
         f"use_errno=True); os._exit(0 if libc.unshare({flags}) == 0 else ctypes.get_errno())"],
        timeout=60)
    return None if probe.returncode == 0 else f"unshare failed (errno {probe.returncode})"


_REFUSED = _machine_refuses_namespaces()
needs_namespaces = pytest.mark.skipif(
    _REFUSED is not None, reason=f"this machine cannot make the sandbox's namespaces: {_REFUSED}")


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


class Unavailable:
    """An executor whose every run fails as the sandbox itself would (a service down)."""

    def run(self, *args, **kwargs):
        raise SandboxError("the sandbox is unavailable")

"""What one execution of model-written code gives back, and how its stop is named.

Every backend returns an ``ExecutionResult``; a failure of the sandbox itself (it could not
start the code, the service is down) is a ``SandboxError`` instead, never a result, so the
code is never blamed for the machinery around it.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from align.config import SandboxLimits
from align.errors import InfrastructureError

STOP_REASONS = ("wall_time", "cpu_time", "memory", "file_size", "disk", "open_files",
                "processes", "output")
"""Names of what can stop an execution: a limit of ``SandboxLimits`` it ran into."""


class SandboxError(InfrastructureError):
    """The sandbox failed, not the code: it could not be set up, or the service did not answer.

    A reward stops the run with it; an episode counts it as an infrastructure failure and keeps
    the episode out of its group's baseline.
    """


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of running code once.

    ``exit_code`` follows ``subprocess``: a negative value is the signal that ended the
    process (-9 when the sandbox killed it). ``stopped_by`` names the limit that ended it (one
    of ``STOP_REASONS``) or is None when the code ended on its own; ``timed_out`` is
    ``stopped_by == "wall_time"``. Output past ``max_output_bytes`` is cut, and the cut flagged.
    """

    stdout: str
    stderr: str
    exit_code: int
    stopped_by: str | None
    seconds: float  # wall clock, from start-up to the last byte of output
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def timed_out(self) -> bool:
        return self.stopped_by == "wall_time"

    @property
    def ok(self) -> bool:
        """Whether the code ran to its end and exited 0."""
        return self.exit_code == 0 and self.stopped_by is None


class Executor(Protocol):
    """A backend: runs a program once, contained (``LocalExecutor``, ``HttpExecutor``)."""

    def run(self, code: str | None = None, *, files: Mapping[str, str | bytes] | None = None,
            stdin: str | bytes = b"", limits: SandboxLimits | None = None,
            entry: str = "main.py") -> ExecutionResult:
        """Run ``code`` (as ``entry``) or ``files[entry]``; raise SandboxError on the sandbox's
        own failure."""
        ...


# The exception line Python prints last when a limit refused something; the last match in the
# tail of stderr names the limit. Exits 0 are never classified.
_STDERR_SIGNS = (
    ("memory", re.compile(r"MemoryError|Cannot allocate memory|\[Errno 12\]|"
                          r"failed to map segment")),  # the last: the dynamic loader's
    ("file_size", re.compile(r"File too large|\[Errno 27\]")),
    ("disk", re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded")),
    ("open_files", re.compile(r"Too many open files|\[Errno 24\]|Error 24")),
    ("processes", re.compile(r"Resource temporarily unavailable|\[Errno 11\]|"
                             r"can't start new thread")),
)
_TAIL_CHARS = 4096


def classify_stop(exit_code: int, stderr: str, cpu_seconds: float | None,
                  cpu_limit_s: float) -> str | None:
    """The limit that ended a process that exited on its own (not killed by the sandbox).

    Args:
        exit_code: As ``subprocess`` reports it (negative: the signal).
        stderr: What the process wrote on stderr; its last traceback names a refused request.
        cpu_seconds: CPU time the process used, where known.
        cpu_limit_s: The RLIMIT_CPU it ran under.

    Returns:
        One of ``STOP_REASONS``, or None when no limit shows.
    """
    if exit_code == 0:
        return None
    if exit_code == -signal.SIGXCPU or (exit_code == -signal.SIGKILL and cpu_seconds is not None
                                        and cpu_seconds >= cpu_limit_s):
        return "cpu_time"
    if exit_code == -signal.SIGXFSZ:
        return "file_size"
    best, where = None, -1
    tail = stderr[-_TAIL_CHARS:]
    for reason, pattern in _STDERR_SIGNS:
        for match in pattern.finditer(tail):
            if match.start() > where:
                best, where = reason, match.start()
    return best

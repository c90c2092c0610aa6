"""What the sandbox did in this process since it was last asked: the ``sandbox/*`` metrics.

Every execution through an ``align.sandbox.Sandbox`` is counted here, from any thread; the
trainer takes the counts once per logged step (``take_metrics``), so each step's line of
metrics.jsonl tells what ran during that step.
"""

from __future__ import annotations

import threading
from collections import Counter

from align.sandbox.result import ExecutionResult


class SandboxCounts:
    """Thread-safe tallies of executions and infrastructure failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.executions = self.ok = self.errors = self.infra_failures = 0
        self.truncated = 0
        self.seconds: list[float] = []
        self.stopped: Counter[str] = Counter()

    def record(self, result: ExecutionResult) -> None:
        """Count one execution that ran (whatever the code did)."""
        with self._lock:
            self.executions += 1
            self.seconds.append(result.seconds)
            if result.stopped_by is not None:
                self.stopped[result.stopped_by] += 1
            elif result.exit_code == 0:
                self.ok += 1
            else:
                self.errors += 1
            self.truncated += result.stdout_truncated or result.stderr_truncated

    def record_failure(self) -> None:
        """Count one execution the sandbox itself failed to run."""
        with self._lock:
            self.infra_failures += 1

    def take_metrics(self) -> dict[str, float]:
        """The ``sandbox/*`` metrics since the last call (empty when nothing ran), and reset.

        Returns:
            ``sandbox/executions``, ``ok`` (exit 0), ``errors`` (a non-zero exit of the code's
            own), ``stopped`` (a limit ended it) and ``stopped_<limit>`` per limit,
            ``timeouts``, ``truncated`` (output cut), ``infra_failures`` (the sandbox's own),
            ``seconds_mean`` and ``seconds_max``.
        """
        with self._lock:
            if not self.executions and not self.infra_failures:
                return {}
            seconds = self.seconds or [0.0]
            metrics = {"sandbox/executions": float(self.executions),
                       "sandbox/ok": float(self.ok), "sandbox/errors": float(self.errors),
                       "sandbox/stopped": float(sum(self.stopped.values())),
                       "sandbox/timeouts": float(self.stopped["wall_time"]),
                       "sandbox/truncated": float(self.truncated),
                       "sandbox/infra_failures": float(self.infra_failures),
                       "sandbox/seconds_mean": sum(seconds) / len(seconds),
                       "sandbox/seconds_max": max(seconds)}
            metrics.update({f"sandbox/stopped_{reason}": float(n)
                            for reason, n in sorted(self.stopped.items())})
            self._reset()
            return metrics


COUNTS = SandboxCounts()
"""The process's tallies, shared by every Sandbox."""


def take_metrics() -> dict[str, float]:
    """The ``sandbox/*`` metrics of this process since the last call (see SandboxCounts)."""
    return COUNTS.take_metrics()

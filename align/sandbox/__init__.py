"""Running model-written code, contained: the ``python`` tool of episodes and the
``reward_models.builtin:code_tests`` reward run it here (docs/sandbox.md).

    from align.sandbox import Sandbox
    result = Sandbox().run("print(6 * 7)")        # ExecutionResult(stdout='42\\n', ...)
    result.exit_code, result.stopped_by, result.seconds

Backends (``sandbox.backend``): ``local`` (Linux namespaces and rlimits on this machine,
``align.sandbox.local`` and ``launcher``) and ``http`` (a SandboxFusion service,
``align.sandbox.remote``). Limits are ``SandboxLimits`` (``sandbox.limits.*`` in a config).
A failure of the sandbox itself is a ``SandboxError`` (an ``InfrastructureError``), never an
``ExecutionResult``.
"""

from __future__ import annotations

from align.config import SandboxConfig, SandboxLimits
from align.sandbox.counts import take_metrics
from align.sandbox.local import LocalExecutor
from align.sandbox.remote import HttpExecutor
from align.sandbox.result import STOP_REASONS, ExecutionResult, Executor, SandboxError
from align.sandbox.sandbox import (
    Job,
    Sandbox,
    configure,
    default_sandbox,
    make_executor,
    named_in,
    start_for_run,
)

__all__ = [
    "STOP_REASONS",
    "ExecutionResult",
    "Executor",
    "HttpExecutor",
    "Job",
    "LocalExecutor",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxLimits",
    "configure",
    "default_sandbox",
    "make_executor",
    "named_in",
    "start_for_run",
    "take_metrics",
]

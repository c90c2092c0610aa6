"""Sandbox: a backend with its limits, a cap on executions at once, and counts; and the
process's default one, which the ``python`` tool and ``code_tests`` use.

The default comes from ``configure(cfg.sandbox)``, which ``align ppo`` calls at start-up; a
process where nothing called it (a Ray worker, a script) reads the settings from the
environment variable ``ALIGN_SANDBOX`` (a JSON object of ``SandboxConfig`` keys, which
``configure`` also sets for the processes started after it), else uses the defaults. Whichever
way, the default sandbox checks its settings with one small execution before its first use
(``align.sandbox.checks``), so a limit too low for Python to start fails at once, naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from align.config import SandboxConfig, SandboxLimits
from align.config_loading import from_dict
from align.errors import ConfigError
from align.sandbox.checks import check_start, check_values
from align.sandbox.counts import COUNTS
from align.sandbox.local import MAIN, LocalExecutor
from align.sandbox.remote import HttpExecutor
from align.sandbox.result import ExecutionResult, Executor, SandboxError

ENV_VAR = "ALIGN_SANDBOX"
# Config entries that run code in the default sandbox: a run naming one checks it at start-up.
ENTRY_POINTS = ("reward_models.builtin:code_tests", "align.sandbox.tools:")


@dataclass(frozen=True)
class Job:
    """One program to run: ``code`` (as main.py) or ``files[entry]``, with ``stdin``."""

    code: str | None = None
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    stdin: str | bytes = b""
    entry: str = MAIN


def make_executor(config: SandboxConfig) -> Executor:
    """The backend ``config.backend`` names, built from its settings."""
    if config.backend == "http":
        if not config.url:
            raise ConfigError("sandbox.backend is http but sandbox.url is not set")
        return HttpExecutor(config.url, config.max_tries, config.backoff_s, config.token_env)
    return LocalExecutor(config.python, config.allow_network, config.hide_paths, config.env)


class Sandbox:
    """A backend with its limits: ``run`` one program, or ``run_many`` at most
    ``max_concurrent`` at once; every execution is counted (``align.sandbox.counts``).

    Args:
        config: Backend, limits and cap; None: the defaults.
        executor: The backend to use instead of the one ``config`` names.
    """

    def __init__(self, config: SandboxConfig | None = None,
                 executor: Executor | None = None) -> None:
        self.config = config or SandboxConfig()
        self.executor = executor or make_executor(self.config)
        self._slots = threading.BoundedSemaphore(self.config.max_concurrent)

    def run(self, code: str | None = None, *, files: Mapping[str, str | bytes] | None = None,
            stdin: str | bytes = b"", limits: SandboxLimits | None = None,
            entry: str = MAIN) -> ExecutionResult:
        """Run a program under this sandbox's limits (or ``limits``); waits for a free slot.

        Raises:
            SandboxError: The sandbox failed, not the code (counted as an infra failure).
        """
        with self._slots:
            try:
                result = self.executor.run(code, files=files, stdin=stdin,
                                           limits=limits or self.config.limits, entry=entry)
            except SandboxError:
                COUNTS.record_failure()
                raise
        COUNTS.record(result)
        return result

    def run_many(self, jobs: Sequence[Job],
                 limits: SandboxLimits | None = None) -> list[ExecutionResult]:
        """Run every job, ``max_concurrent`` at once; results in the jobs' order.

        Raises:
            SandboxError: The first the sandbox raised, once every job has finished.
        """
        if not jobs:
            return []

        def one(job: Job) -> ExecutionResult | SandboxError:
            try:
                return self.run(job.code, files=job.files, stdin=job.stdin, limits=limits,
                                entry=job.entry)
            except SandboxError as err:
                return err

        workers = min(len(jobs), self.config.max_concurrent)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            outcomes = list(pool.map(one, jobs))
        for outcome in outcomes:
            if isinstance(outcome, SandboxError):
                raise outcome
        return outcomes  # type: ignore[return-value]


_default: Sandbox | None = None
_configured: SandboxConfig | None = None
_lock = threading.Lock()


def configure(config: SandboxConfig | None) -> None:
    """Make ``config`` this process's sandbox settings (and the environment's, for processes
    started later); the default sandbox is built, and checked, at its first use. None forgets
    them: the default then comes from ``ALIGN_SANDBOX`` as set before, or the defaults.

    Raises:
        ConfigError: A value out of range, naming its key (``align.sandbox.checks``).
    """
    if config is not None:
        check_values(config)
    global _default, _configured
    with _lock:
        _configured, _default = config, None
        if config is not None:
            os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(config))


def default_sandbox() -> Sandbox:
    """The process's sandbox: built from ``configure``'s settings, else from ``ALIGN_SANDBOX``,
    else the defaults, and checked with one execution the first time.

    Raises:
        ConfigError: A setting that stops Python from starting, or a backend that cannot run
            (no namespaces here, a URL that does not answer), naming the key.
    """
    global _default
    with _lock:
        if _default is None:
            config = _configured or settings_from_environment()
            sandbox = Sandbox(config)
            check_start(config, sandbox.executor)
            _default = sandbox
        return _default


def settings_from_environment() -> SandboxConfig:
    """``SandboxConfig`` from the ``ALIGN_SANDBOX`` variable (JSON), or the defaults."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return SandboxConfig()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{ENV_VAR} is not a JSON object of sandbox settings: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{ENV_VAR} must be a JSON object of sandbox settings")
    config = from_dict(SandboxConfig, data, prefix="sandbox.")
    check_values(config)
    return config


def named_in(specs: Sequence[object]) -> bool:
    """Whether config entries (reward specs, tool functions) name one of ``ENTRY_POINTS``."""
    texts = [t for s in specs for t in (s if isinstance(s, (list, tuple)) else [s])]
    return any(isinstance(t, str) and point in t for t in texts for point in ENTRY_POINTS)


def start_for_run(cfg: Any) -> None:
    """A PPO run's sandbox: `cfg.sandbox` configured, and, where its rewards or tools run
    code (`named_in`), built and checked now, before any actor starts.

    Raises:
        ConfigError: as `configure` and `default_sandbox`, naming the key.
    """
    configure(cfg.sandbox)
    if named_in([r.spec for r in (*cfg.rewards, *cfg.gold_rewards)] + cfg.environment.tools):
        default_sandbox()

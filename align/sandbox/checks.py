"""Checks of sandbox settings, each failure a ConfigError naming the key (the CLI exits 2).

``check_values`` is static: ranges, and what each backend needs. ``check_start`` runs one
small program through the sandbox: where it fails, the message says why in terms of a setting
(a limit below what Python needs to start, namespaces this machine will not make, a service
URL that does not answer), so a run never starts with a sandbox that fails every execution.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

from align.config import SandboxConfig, SandboxLimits
from align.errors import ConfigError
from align.sandbox.result import Executor, SandboxError

PROBE = "import sys\nsys.stdout.write('ok')\n"
_MINIMUM = {"timeout_s": 0.0, "cpu_time_s": 1, "memory_mb": 1, "file_size_mb": 1, "disk_mb": 1,
            "open_files": 1, "processes": 1, "max_output_bytes": 1}


def check_values(config: SandboxConfig) -> None:
    """Ranges of the limits and options, and what the chosen backend needs.

    Raises:
        ConfigError: Naming the key (``sandbox.limits.memory_mb``) and the accepted range.
    """
    for name, minimum in _MINIMUM.items():
        value = getattr(config.limits, name)
        strict = name == "timeout_s"
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise ConfigError(f"sandbox.limits.{name} must be {bound}, got {value!r}")
    for name, minimum in (("max_concurrent", 1), ("max_tries", 1)):
        if getattr(config, name) < minimum:
            raise ConfigError(f"sandbox.{name} must be >= {minimum}, "
                              f"got {getattr(config, name)!r}")
    if not config.backoff_s >= 0:
        raise ConfigError(f"sandbox.backoff_s must be >= 0, got {config.backoff_s!r}")
    if config.backend == "http" and not (config.url or "").startswith(("http://", "https://")):
        raise ConfigError(f"sandbox.backend is http: sandbox.url must be the service's "
                          f"http(s):// address, got {config.url!r}")
    if config.backend == "local" and config.python is not None and \
            shutil.which(config.python) is None:
        raise ConfigError(f"sandbox.python: no interpreter at {config.python!r}")
    if config.backend == "local" and os.name != "posix":
        raise ConfigError("sandbox.backend=local needs Linux namespaces; use sandbox.backend="
                          "http with a SandboxFusion service")


def check_start(config: SandboxConfig, executor: Executor) -> None:
    """Run a one-line program through ``executor`` under ``config``'s limits.

    Raises:
        ConfigError: When it cannot run, naming the setting to change.
    """
    try:
        result = executor.run(PROBE, limits=config.limits)
    except SandboxError as err:
        raise ConfigError(_unavailable(config, err)) from err
    if result.ok and result.stdout == "ok":
        return
    culprit = _limit_to_blame(executor, config.limits)
    detail = (result.stderr.strip().splitlines() or [f"exit status {result.exit_code}"])[-1]
    if result.stopped_by:
        detail = f"stopped by {result.stopped_by}: {detail}"
    if culprit is None:
        raise ConfigError(f"sandbox: a one-line Python program does not run with these "
                          f"settings ({detail}); check sandbox.python and sandbox.limits")
    value, default = getattr(config.limits, culprit), getattr(SandboxLimits(), culprit)
    raise ConfigError(f"sandbox.limits.{culprit}={value} is below what Python needs to start "
                      f"({detail}); raise it (default {default})")


def _unavailable(config: SandboxConfig, err: SandboxError) -> str:
    if config.backend == "http":
        return f"sandbox.url: the sandbox service at {config.url} does not answer: {err}"
    text = str(err)
    if "network namespace" in text:
        return (f"the local sandbox cannot make a network namespace here ({text}); it refuses "
                "to run code that could reach the network. Set sandbox.allow_network=true "
                "to accept that, or use sandbox.backend=http")
    if "unshare" in text or "mount" in text:
        return (f"the local sandbox cannot make its namespaces here ({text}); run as root, "
                "enable unprivileged user namespaces, or use sandbox.backend=http "
                "(sandbox.backend)")
    return f"sandbox: the local sandbox does not work here ({text}); check sandbox.python"


def _limit_to_blame(executor: Executor, limits: SandboxLimits) -> str | None:
    """The first limit whose default (where higher) alone lets the probe run."""
    defaults = SandboxLimits()
    for field in dataclasses.fields(SandboxLimits):
        value, default = getattr(limits, field.name), getattr(defaults, field.name)
        if value >= default:
            continue
        relaxed = dataclasses.replace(limits, **{field.name: default})
        try:
            result = executor.run(PROBE, limits=relaxed)
        except SandboxError:
            return None
        if result.ok and result.stdout == "ok":
            return field.name
    return None

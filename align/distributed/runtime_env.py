"""The Ray runtime environment of a run: the project's code and worker settings, shipped to
every node.

A worker on another node has neither the driver's directory nor its PYTHONPATH. So the
packages `align` and `reward_models` travel through Ray's `py_modules`: Ray zips each package
folder (wherever the driver imports it from: a checkout or site-packages), stores the archive
in the cluster, and unpacks it on a node before a worker of this run starts there, so every
worker imports the driver's code. Rewards run in the driver, so a reward module given by path
(`path/to/file.py:fn`) or by name needs to exist only where the driver runs.

Under `ray job submit --working-dir . -- align ...` Ray already ships the job's folder, and
the driver runs inside it: its settings are merged with these, and a job that names its own
`py_modules` keeps them (Ray refuses two values for one key).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

SHIPPED_PACKAGES = ("align", "reward_models")
EXCLUDES = ["__pycache__/", "*.pyc"]  # bytecode differs per host and would change the hash
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a submitted job


def package_dir(name: str) -> str:
    """The folder a project package is imported from on this machine."""
    module = importlib.import_module(name)
    return str(Path(module.__file__).resolve().parent)


def submitted_job_env() -> dict[str, Any]:
    """The runtime environment of the Ray job this driver runs as ({} outside a job)."""
    text = os.environ.get(JOB_CONFIG_ENV)
    if not text:
        return {}
    return json.loads(text).get("runtime_env") or {}


def run_runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    """The `runtime_env` for `ray.init`: the project packages and `env_vars` for every worker,
    less what a submitted job's own runtime environment already sets."""
    job = submitted_job_env()
    taken = job.get("env_vars") or {}
    env: dict[str, Any] = {"env_vars": {k: v for k, v in env_vars.items() if k not in taken}}
    if "py_modules" not in job:
        env["py_modules"] = [package_dir(name) for name in SHIPPED_PACKAGES]
        if "excludes" not in job:
            env["excludes"] = list(EXCLUDES)
    return env

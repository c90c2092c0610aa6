"""The runtime environment that ships the project to every worker, and which cluster a run joins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.runtime_env.runtime_env import _merge_runtime_env

from align.distributed import ensure_ray
from align.distributed.runtime_env import JOB_CONFIG_ENV, run_runtime_env

ROOT = Path(__file__).resolve().parents[2]


def test_the_project_packages_travel_with_the_run(monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    env = run_runtime_env({"OMP_WAIT_POLICY": "PASSIVE"})
    assert env["py_modules"] == [str(ROOT / "align"), str(ROOT / "reward_models")]
    assert env["env_vars"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "__pycache__/" in env["excludes"]


def test_a_submitted_job_keeps_its_own_settings(monkeypatch):
    """Under `ray job submit`, Ray merges the job's runtime env with the driver's and refuses a
    key set twice: what the job sets is left out, so the merge succeeds."""
    job = {"working_dir": "gcs://_ray_pkg_x.zip", "py_modules": ["gcs://_ray_pkg_y.zip"],
           "env_vars": {"OMP_WAIT_POLICY": "ACTIVE"}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": job}))
    env = run_runtime_env({"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"})
    assert env == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    assert _merge_runtime_env(job, env) is not None

    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://x"}}))
    assert len(run_runtime_env({})["py_modules"]) == 2  # a working_dir alone: still shipped


@pytest.mark.slow
def test_ray_address_from_the_environment_joins_that_cluster(monkeypatch):
    """`ray job submit` tells its driver the cluster through RAY_ADDRESS; with no
    distributed.ray_address the run joins it rather than starting a Ray of its own."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        ensure_ray(None)
        assert ray.get_runtime_context().gcs_address == cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()

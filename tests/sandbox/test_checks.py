"""Bad sandbox settings stop a run at start-up, exit 2, and name the key; the default sandbox
takes the run's settings, or the environment's."""

from __future__ import annotations

import json
import os

import pytest

from align.errors import ConfigError
from align.sandbox import Sandbox, SandboxConfig, SandboxLimits, configure, default_sandbox
from align.sandbox.checks import check_start, check_values
from align.sandbox.sandbox import ENV_VAR, named_in
from tests.conftest import CPU_FP32, TINY
from tests.sandbox.conftest import needs_namespaces
from tests.test_cli import run_align

pytestmark = needs_namespaces


@pytest.mark.parametrize(("limits", "key"), [
    (SandboxLimits(memory_mb=8), "sandbox.limits.memory_mb=8"),
    (SandboxLimits(open_files=3), "sandbox.limits.open_files=3"),
    (SandboxLimits(timeout_s=0.01), "sandbox.limits.timeout_s=0.01"),
])
def test_a_limit_python_cannot_start_under_is_named(limits, key):
    with pytest.raises(ConfigError, match=f"{key} is below what Python needs to start"):
        config = SandboxConfig(limits=limits)
        check_start(config, Sandbox(config).executor)


@pytest.mark.parametrize(("config", "needle"), [
    (SandboxConfig(limits=SandboxLimits(processes=0)), "sandbox.limits.processes must be >= 1"),
    (SandboxConfig(limits=SandboxLimits(timeout_s=0)), "sandbox.limits.timeout_s must be > 0"),
    (SandboxConfig(max_concurrent=0), "sandbox.max_concurrent must be >= 1"),
    (SandboxConfig(backend="http"), "sandbox.url must be the service's http(s):// address"),
    (SandboxConfig(python="/no/such/python"), "sandbox.python: no interpreter"),
])
def test_values_out_of_range_are_named(config, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_values(config)


def test_the_default_sandbox_takes_the_configured_settings_then_the_environment(monkeypatch):
    configure(SandboxConfig(limits=SandboxLimits(timeout_s=3.5)))
    assert default_sandbox().config.limits.timeout_s == 3.5
    assert json.loads(os.environ[ENV_VAR])["limits"]["timeout_s"] == 3.5
    configure(None)
    monkeypatch.setenv(ENV_VAR, json.dumps({"limits": {"memory_mb": 700}}))
    assert default_sandbox().config.limits.memory_mb == 700
    configure(None)
    monkeypatch.setenv(ENV_VAR, json.dumps({"limits": {"memory_mb": 8}}))
    with pytest.raises(ConfigError, match="sandbox.limits.memory_mb=8"):
        default_sandbox()
    monkeypatch.setenv(ENV_VAR, json.dumps({"limit": {}}))
    with pytest.raises(ConfigError, match="unknown config key 'sandbox.limit'"):
        default_sandbox()


def test_runs_that_name_the_sandbox_are_told_apart():
    assert named_in(["reward_models.builtin:code_tests", "reward_models.builtin:exact_match"])
    assert named_in(["align.sandbox.tools:python"])
    assert not named_in(["reward_models.builtin:exact_match", ["rm-a", "rm-b"]])


def run_ppo(tmp_path, *overrides):
    """`align ppo` on a tiny model with code_tests as its reward, in this process."""
    config = tmp_path / "ppo.yaml"
    config.write_text(f"# align ppo {config}\n")
    return run_align("ppo", str(config), f"output_dir={tmp_path / 'run'}", *CPU_FP32,
                     *(f"model.embedded.{key}={value}" for key, value in TINY.items()),
                     "task.num_train=32", "task.num_eval=8",
                     "rewards=[{spec: 'reward_models.builtin:code_tests'}]", *overrides,
                     cwd=tmp_path)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["sandbox.backend=docker"], "'sandbox.backend' must be one of local, http; got 'docker'"),
    (["sandbox.limits.memory_mb=8"], "sandbox.limits.memory_mb=8 is below what Python needs"),
    (["sandbox.backend=http"], "sandbox.url must be the service's http(s):// address"),
    (["sandbox.backend=http", "sandbox.url=http://127.0.0.1:9", "sandbox.max_tries=1"],
     "sandbox.url: the sandbox service at http://127.0.0.1:9 does not answer"),
], ids=["backend", "limit", "no-url", "url-silent"])
def test_align_ppo_exits_2_naming_the_key(tmp_path, overrides, needle):
    result = run_ppo(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()

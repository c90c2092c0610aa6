"""GRPO with reward_models.builtin:code_tests on a tiny model and a few code tasks, end to end:
every sampled completion runs in the sandbox, and the sandbox's counts reach metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from align.tracking import read_metrics
from align.trainers.ppo import PPOTrainer
from tests.conftest import full_only, tiny_ppo_config

pytestmark = [pytest.mark.slow, full_only]

# Prompts open a code fence, as base-model code prompts do; tests in the forms datasets use
# (as JSON text, one column type for every row).
ROWS = [
    {"prompt": "def add(a, b):\n```python\n",
     "tests": json.dumps(["assert add(1, 2) == 3", "assert add(0, 0) == 0"])},
    {"prompt": "Print the first word.\n```python\n",
     "tests": json.dumps({"inputs": ["a b\n", "c\n"], "outputs": ["a\n", "c\n"]})},
    {"prompt": "Print nothing.\n```python\n",
     "tests": json.dumps({"inputs": [""], "outputs": [""]})},
    {"prompt": "def solve(x):\n```python\n",
     "tests": json.dumps({"fn_name": "solve", "inputs": [[1]], "outputs": [[2]]})},
]


def test_grpo_with_code_tests_logs_the_sandbox(tmp_path, ray_local):
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 4))
    cfg = tiny_ppo_config(tmp_path, f"data.train={data}",
                          "rewards=[{spec: 'reward_models.builtin:code_tests'}]",
                          "rollout.max_new_tokens=12", "data.max_length=48",
                          "eval.max_samples=0", "task.num_eval=0",
                          "sandbox.limits.timeout_s=5", "sandbox.max_concurrent=4")
    summary = PPOTrainer(cfg, show_progress=False).fit()
    assert summary["steps"] == 2
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "policy_loss" in m]
    samples = cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt
    assert len(steps) == 2
    for metrics in steps:
        # stdin/stdout rows run once per case; the others once per completion
        assert metrics["sandbox/executions"] >= samples
        assert metrics["sandbox/infra_failures"] == 0
        assert 0.0 <= metrics["rewards/code_tests/mean"] <= 1.0
        assert metrics["sandbox/seconds_mean"] > 0

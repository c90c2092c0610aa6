"""reward_models.builtin:code_tests, loaded as a config names it: each test form, the
fraction passed, ways to fake a pass that must fail, concurrency, and the sandbox's failures."""

from __future__ import annotations

import json
import time

import pytest

from align.errors import RewardError
from align.sandbox import Sandbox, SandboxConfig, SandboxLimits, configure, take_metrics
from align.sandbox.code_tests import extract_code
from reward_models import load_reward
from tests.sandbox.conftest import Unavailable, needs_namespaces

pytestmark = needs_namespaces
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
SUB = "Here it is:\n```python\ndef add(a, b):\n    return a - b\n```\nDone."
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4"]


def score(completions, tests, **kwargs):
    reward = load_reward({"spec": "reward_models.builtin:code_tests", "kwargs": kwargs})
    return reward(["prompt"] * len(completions), completions, tests=tests)


@pytest.fixture(autouse=True)
def quick_limits():
    configure(SandboxConfig(limits=SandboxLimits(timeout_s=1.5, cpu_time_s=1)))


def test_assert_lists_score_the_fraction_passed():
    assert score([ADD, SUB], [ADD_TESTS, ADD_TESTS]) == [1.0, pytest.approx(1 / 3)]
    assert score([ADD, SUB], [ADD_TESTS, ADD_TESTS], all_or_nothing=True) == [1.0, 0.0]


def test_a_string_of_asserts_counts_each_and_runs_its_set_up():
    tests = "import math\nvalue = add(2, 2)\nassert value == 4\nassert add(1, 1) == math.e\n"
    assert score([ADD], [tests]) == [0.5]


def test_stdin_stdout_cases_in_the_forms_datasets_use():
    echo_first = "```python\nprint(input().split()[0])\n```"
    apps = json.dumps({"inputs": ["5 6\n", "7\n"], "outputs": ["5\n", "8\n"]})
    listed = [{"input": "a b\n", "output": "a"}, {"input": "c\n", "output": "c \n\n"}]
    assert score([echo_first, echo_first], [apps, listed]) == [0.5, 1.0]


def test_call_cases_compare_return_values():
    solution = "```python\ndef solve(x, y):\n    return x * y\n```"
    tests = {"fn_name": "solve", "inputs": [[2, 3], [4, 5]], "outputs": [[6], [21]]}
    assert score([solution], [tests]) == [0.5]


def test_chat_completions_and_rows_without_tests():
    chat = [{"role": "assistant", "content": ADD}]
    assert score([chat, ADD, ADD], [ADD_TESTS, None, []]) == [1.0, None, None]


@pytest.mark.parametrize("cheat", [
    "import os\nos._exit(0)",  # leave before the tests run
    "import sys\nsys.exit(0)",
    "def add(a, b):\n    return -1\nfor i in range(3):\n    print(i)\n    print('pass', i)",
    "def add(a, b):\n    raise SystemExit(0)",
    "while True:\n    pass",  # never ends: the CPU limit, then 0
])
def test_ways_to_fake_a_pass_score_zero(cheat):
    started = time.monotonic()
    assert score([f"```python\n{cheat}\n```"], [ADD_TESTS]) == [0.0]
    assert time.monotonic() - started < 1.5 + 2.5  # the deadline, start-up and a margin


def test_executions_run_concurrently_up_to_the_cap():
    configure(SandboxConfig(max_concurrent=8, limits=SandboxLimits(timeout_s=5)))
    sleeper = "```python\nimport time\ntime.sleep(1)\nprint(1)\n```"
    take_metrics()
    started = time.monotonic()
    assert score([sleeper] * 8, [{"inputs": [""], "outputs": ["1"]}] * 8) == [1.0] * 8
    assert time.monotonic() - started < 6  # one at a time would take 8 s
    metrics = take_metrics()
    assert metrics["sandbox/executions"] == 8 and metrics["sandbox/ok"] == 8


def test_a_sandbox_failure_stops_the_run(monkeypatch):
    monkeypatch.setattr("align.sandbox.default_sandbox",
                        lambda: Sandbox(executor=Unavailable()))
    with pytest.raises(RewardError, match="code_tests.*SandboxError: the sandbox is unavail"):
        score([ADD], [ADD_TESTS])


def test_tests_of_no_known_shape_name_the_row():
    with pytest.raises(RewardError, match="row 1: tests of an unknown shape"):
        score([ADD, ADD], [ADD_TESTS, [1, 2]])


@pytest.mark.parametrize(("text", "code"), [
    ("```python\na = 1\n```\ntext\n```py\nb = 2\n```", "b = 2\n"),  # the last block
    ("x = 1\n```\nprose", "x = 1\n"),  # a prompt that opened the fence
    ("x = 1", "x = 1"),
])
def test_the_code_is_the_last_block(text, code):
    assert extract_code(text) == code

"""`timeout_s` on a reward: a call that hangs (sync or async) fails with the reward named, a
reward that needs the main thread still runs there, and no stray interrupt escapes later."""

from __future__ import annotations

import signal
import textwrap
import threading
import time

import pytest

from align.errors import ConfigError, RewardError
from reward_models import CombinedReward, RewardSpec, load_reward

HANGING = """
    import asyncio
    import signal
    import time

    def hang(prompts, completions, **kwargs):
        time.sleep(60)
        return [0.0] * len(completions)

    def swallows(prompts, completions, **kwargs):
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            pass  # careless code: the answer comes too late and must not count
        return [0.0] * len(completions)

    async def async_hang(prompts, completions, **kwargs):
        await asyncio.sleep(60)
        return [0.0] * len(completions)

    def uses_sigalrm(prompts, completions, **kwargs):
        # math_verify-style: signal.signal works only on the main thread
        previous = signal.signal(signal.SIGALRM, lambda *a: None)
        signal.signal(signal.SIGALRM, previous)
        return [1.0] * len(completions)

    def ctrl_c(prompts, completions, **kwargs):
        raise KeyboardInterrupt
"""
PROMPTS, COMPLETIONS = ["Q: 1+1="], [" 2"]


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "hanging.py"
    path.write_text(textwrap.dedent(HANGING))
    return path


def reward(path, fn: str, timeout_s: float | None = 0.5):
    return load_reward(RewardSpec(f"{path}:{fn}", timeout_s=timeout_s))


def test_runs_on_the_main_thread_with_the_default_sigint_handler():
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("fn", ["hang", "swallows", "async_hang"])
def test_a_hanging_reward_fails_within_its_timeout_naming_it(rewards_file, fn):
    started = time.monotonic()
    with pytest.raises(RewardError, match=rf"hanging.py:{fn}' did not return within "
                                          r"timeout_s=0.5 s"):
        CombinedReward.from_specs([RewardSpec(f"{rewards_file}:{fn}", timeout_s=0.5)]).score(
            PROMPTS, COMPLETIONS)
    assert time.monotonic() - started < 3
    time.sleep(1.5)  # no interrupt arrives after the error was raised


def test_off_the_main_thread_the_call_is_bounded_too(rewards_file):
    errors = []

    def target():
        try:
            reward(rewards_file, "hang")(PROMPTS, COMPLETIONS)
        except RewardError as err:
            errors.append(str(err))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    assert errors and "did not return within timeout_s=0.5" in errors[0]


def test_a_main_thread_reward_keeps_working_and_ctrl_c_stays_ctrl_c(rewards_file):
    assert reward(rewards_file, "uses_sigalrm")(PROMPTS, COMPLETIONS) == [1.0]
    with pytest.raises(KeyboardInterrupt):
        reward(rewards_file, "ctrl_c", timeout_s=30)(PROMPTS, COMPLETIONS)


def test_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
        RewardSpec("reward_models.builtin:exact_match", timeout_s=0)

"""Environments load as users wrote them for TRL (classes with sync and async tools and
get_reward, plain tool functions), one instance per episode; every bad input is a ConfigError
naming its key, and `align ppo` exits 2 on one before anything starts."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from align.cli import main
from align.config import EnvironmentConfig, PPOConfig, load_config
from align.episodes import (
    Step,
    ToolExecutor,
    TurnEnvironment,
    check_tool_template,
    load_environment,
)
from align.errors import ConfigError, EpisodeError
from tests.chat_models import chatml_tokenizer, trl_template

# An environment exactly in the form TRL documents for GRPOTrainer(environment_factory=...).
TRL_ENV = '''
class CounterEnv:
    def __init__(self):
        self.counter = 0
        self.reward = 0.0

    def reset(self, **kwargs) -> str | None:
        self.counter = kwargs.get("start", 0)
        return None

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter

    async def lookup(self, key: str) -> str:
        """
        Look a key up in a slow store.

        Args:
            key: The key to look up.
        """
        return key * 2

    def get_reward(self) -> float:
        return float(self.counter)

    def _helper(self, x):
        return x
'''

TOOLS = '''
def add(a: int, b: int) -> int:
    """
    Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


async def shout(text: str) -> str:
    """
    Upper-case a text.

    Args:
        text: The text.
    """
    return text.upper()


def untyped(a):
    """
    No type hints.

    Args:
        a: Something.
    """


def undocumented(a: int) -> int:
    return a


def increment(step: int) -> int:
    """
    Clash with CounterEnv.increment.

    Args:
        step: Step.
    """
    return step
'''


class AsyncRewardEnv:
    """Module form (`tests.test_episode_environment:AsyncRewardEnv`) with an async reward."""

    def reset(self, **kwargs) -> str:
        self.target = kwargs["target"]
        return f"Reach {self.target}."

    async def get_reward(self) -> float:
        await asyncio.sleep(0)
        return 1.0 if self.target == 3 else 0.0


class Guess(TurnEnvironment):
    def reset(self, answer: int, **row) -> str:
        self.answer, self.turns = answer, 0
        return "Guess a number."

    def step(self, action: str) -> Step:
        self.turns += 1
        if action.strip() == str(self.answer):
            return Step(reward=1.0, done=True)
        return Step(observation="no", reward=-0.1)

    def get_reward(self) -> float:
        return 1.0 / self.turns


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "envs.py").write_text(TRL_ENV)
    (tmp_path / "tools.py").write_text(TOOLS)
    (tmp_path / "more_tools.py").write_text(textwrap.dedent('''
        def add(x: int) -> int:
            """
            Another add.

            Args:
                x: X.
            """
            return x
    '''))
    return tmp_path


def env_config(**kwargs) -> EnvironmentConfig:
    return EnvironmentConfig(**kwargs)


def test_a_trl_class_from_a_file(files):
    spec = load_environment(env_config(spec=f"{files}/envs.py:CounterEnv"))
    assert (spec.name, spec.protocol, spec.has_reward) == ("CounterEnv", "tools", True)
    assert [s["function"]["name"] for s in spec.schemas] == ["increment", "lookup"]
    assert spec.schemas[0]["function"]["parameters"]["required"] == ["step"]
    env = spec.new()
    assert env.reset({"start": 5, "answer": "x"}) is None
    increment, is_async = env.tool("increment")
    assert not is_async and increment(step=2) == 7
    lookup, is_async = env.tool("lookup")
    assert is_async and asyncio.run(lookup(key="ab")) == "abab"
    assert [env.tool(n) for n in ("reset", "get_reward", "_helper", "nope")] == [None] * 4
    assert env.reward() == 7.0


def test_one_instance_per_episode(files):
    spec = load_environment(env_config(spec=f"{files}/envs.py:CounterEnv"))
    first, second = spec.new(), spec.new()
    assert first.instance is not second.instance
    first.reset({})
    second.reset({})
    first.tool("increment")[0](step=3)
    assert (first.reward(), second.reward()) == (3.0, 0.0)


def test_class_tools_run_through_the_executor(files):
    spec = load_environment(env_config(spec=f"{files}/envs.py:CounterEnv"))
    env = spec.new()
    env.reset({})
    (increment, inc_async), (lookup, lookup_async) = env.tool("increment"), env.tool("lookup")
    executor = ToolExecutor(max_concurrent=2, timeout_s=2)
    results = executor.run([(increment, {"step": 4}, inc_async),
                            (lookup, {"key": "z"}, lookup_async)])
    executor.close()
    assert [r.text for r in results] == ["4", "zz"]
    assert env.reward() == 4.0


def test_a_module_class_with_an_async_reward_and_tool_functions(files):
    spec = load_environment(env_config(spec="tests.test_episode_environment:AsyncRewardEnv",
                                       tools=[f"{files}/tools.py:add", "tools.py:shout"]),
                            base_dir=files)
    assert spec.name == "AsyncRewardEnv" and spec.has_reward
    assert [s["function"]["name"] for s in spec.schemas] == ["add", "shout"]
    env = spec.new()
    assert env.reset({"target": 3}) == "Reach 3."
    assert env.reward() == 1.0
    add, add_async = env.tool("add")
    shout, shout_async = env.tool("shout")
    assert (add(a=1, b=2), add_async, shout_async) == (3, False, True)


def test_tool_functions_alone(files):
    spec = load_environment(env_config(tools=[f"{files}/tools.py:add"]))
    assert (spec.name, spec.protocol, spec.has_reward, spec.env_class) == (
        "tools", "tools", False, None)
    env = spec.new()
    assert env.reset({"a": 1}) is None and env.reward() is None
    assert env.tool("add")[0](a=2, b=2) == 4


def test_a_turn_environment():
    spec = load_environment(env_config(spec="tests.test_episode_environment:Guess"))
    assert (spec.protocol, spec.schemas, spec.has_reward) == ("turns", [], True)
    env = spec.new()
    assert env.reset({"answer": 4}) == "Guess a number."
    assert env.step("3") == Step(observation="no", reward=-0.1)
    assert env.step(" 4 ") == Step(reward=1.0, done=True)
    assert env.reward() == 0.5
    check_tool_template(chatml_tokenizer("qwen2"), spec)  # no tools: any template will do


def test_nothing_configured_is_no_environment():
    assert load_environment(env_config()) is None


def test_environment_failures_name_the_method(files, tmp_path):
    (tmp_path / "broken.py").write_text(textwrap.dedent('''
        class Broken:
            def reset(self, **kwargs):
                raise RuntimeError("sandbox down")

            def get_reward(self):
                return "high"
    '''))
    env = load_environment(env_config(spec=f"{tmp_path}/broken.py:Broken")).new()
    with pytest.raises(EpisodeError, match=r"Broken: reset\(\) raised RuntimeError: sandbox"):
        env.reset({})
    with pytest.raises(EpisodeError, match=r"get_reward\(\) returned 'high'"):
        env.reward()
    with pytest.raises(TypeError, match="step"):
        env.step("x")


def test_environments_that_break_their_contract(tmp_path):
    (tmp_path / "sloppy.py").write_text(textwrap.dedent('''
        from align.episodes import TurnEnvironment

        class Fragile:
            def __init__(self):
                raise OSError("no sandbox left")

            def reset(self, **kwargs):
                return None

        class Sloppy(TurnEnvironment):
            def reset(self, **row):
                return 5

            def step(self, action):
                return "done"
    '''))
    fragile = load_environment(env_config(spec=f"{tmp_path}/sloppy.py:Fragile"))
    with pytest.raises(EpisodeError, match=r"Fragile\(\) raised OSError: no sandbox left"):
        fragile.new()
    sloppy = load_environment(env_config(spec=f"{tmp_path}/sloppy.py:Sloppy")).new()
    with pytest.raises(EpisodeError, match=r"reset\(\) returned a value of type int"):
        sloppy.reset({})
    with pytest.raises(EpisodeError, match=r"step\(\) returned a value of type str; expected"):
        sloppy.step("x")


def write_bad_files(d: Path) -> None:
    (d / "bad.py").write_text(textwrap.dedent('''
        class NoReset:
            def act(self, x: int) -> int:
                """
                Act.

                Args:
                    x: X.
                """

        class Untyped:
            def reset(self, **kwargs):
                return None

            def move(self, direction):
                """
                Move.

                Args:
                    direction: Where.
                """

        class Undocumented:
            def reset(self, **kwargs):
                return None

            def move(self, direction: str) -> str:
                return direction

        class NeedsArgs:
            def __init__(self, url):
                self.url = url

            def reset(self, **kwargs):
                return None

        def not_a_class():
            return None
    '''))
    (d / "turns.py").write_text(textwrap.dedent('''
        from align.episodes import TurnEnvironment

        class NoStep(TurnEnvironment):
            def reset(self, **row):
                return None
    '''))


def bad_inputs(d: Path) -> dict[str, tuple[dict, str]]:
    """Case name -> (environment fields, text the message must hold)."""
    env, tools = f"{d}/envs.py:CounterEnv", f"{d}/tools.py"
    return {
        "missing file": ({"spec": f"{d}/absent.py:Env"}, "absent.py does not exist"),
        "missing module": ({"spec": "no_such_module_here:Env"}, "no module named"),
        "missing class": ({"spec": f"{d}/envs.py:CountEnv"}, "has no class 'CountEnv'"),
        "not a class": ({"spec": f"{d}/bad.py:not_a_class"}, "not a class"),
        "no reset": ({"spec": f"{d}/bad.py:NoReset"}, "has no reset()"),
        "method without hints": ({"spec": f"{d}/bad.py:Untyped"}, "method move() cannot"),
        "method without docstring": ({"spec": f"{d}/bad.py:Undocumented"}, "no docstring"),
        "constructor arguments": ({"spec": f"{d}/bad.py:NeedsArgs"}, "must take no arguments"),
        "turn environment without step": ({"spec": f"{d}/turns.py:NoStep"}, "define step"),
        "turn environment with tools": (
            {"spec": "tests.test_episode_environment:Guess", "tools": [f"{tools}:add"]},
            "environment.tools: Guess is a TurnEnvironment"),
        "missing tool function": ({"tools": [f"{tools}:add", f"{tools}:sub"]},
                                  "environment.tools[1]"),
        "tool without hints": ({"tools": [f"{tools}:add", f"{tools}:untyped"]},
                               "environment.tools[1] '" + f"{tools}:untyped' cannot be a tool"),
        "tool without docstring": ({"tools": [f"{tools}:undocumented"]},
                                   "environment.tools[0]"),
        "tool named like a method": (
            {"spec": env, "tools": [f"{tools}:increment"]},
            "environment.tools[0] '" + f"{tools}:increment': a tool named 'increment' is "
            "already given by environment.spec (method increment())"),
        "two tool functions of one name": (
            {"tools": [f"{tools}:add", f"{d}/more_tools.py:add"]},
            "a tool named 'add' is already given by environment.tools[0]"),
        "max_turns below 1": ({"spec": env, "max_turns": 0}, "environment.max_turns"),
        "max_tokens_per_turn 0": ({"spec": env, "max_tokens_per_turn": 0},
                                  "environment.max_tokens_per_turn"),
        "max_episode_tokens 0": ({"spec": env, "max_episode_tokens": 0},
                                 "environment.max_episode_tokens"),
        "max_tool_output_tokens 0": ({"spec": env, "max_tool_output_tokens": 0},
                                     "environment.max_tool_output_tokens"),
        "tool_timeout_s 0": ({"spec": env, "tool_timeout_s": 0}, "environment.tool_timeout_s"),
        "episode_timeout_s negative": ({"spec": env, "episode_timeout_s": -1},
                                       "environment.episode_timeout_s"),
        "max_concurrent_tools 0": ({"spec": env, "max_concurrent_tools": 0},
                                   "environment.max_concurrent_tools"),
        "failure fraction above 1": ({"spec": env, "max_infra_failure_fraction": 1.5},
                                     "environment.max_infra_failure_fraction"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("/d"))))
def test_bad_inputs_name_the_key(files, case):
    write_bad_files(files)
    fields, needle = bad_inputs(files)[case]
    with pytest.raises(ConfigError) as caught:
        load_environment(env_config(**fields))
    message = str(caught.value)
    assert needle in message, message
    assert message.startswith("environment."), message


def test_a_template_that_cannot_render_tool_calls(files):
    spec = load_environment(env_config(spec=f"{files}/envs.py:CounterEnv"))
    with pytest.raises(ConfigError, match="model.chat_template: environment CounterEnv"):
        check_tool_template(chatml_tokenizer("qwen2"), spec)  # ChatML drops tool_calls
    tokenizer = chatml_tokenizer("qwen2")
    tokenizer.chat_template = trl_template("qwen2_5")
    check_tool_template(tokenizer, spec)


def test_the_config_check_loads_the_environment(files):
    base = ["rewards=[]", "task.num_train=50"]
    load_config(PPOConfig, None, [*base, f"environment.spec={files}/envs.py:CounterEnv"])
    with pytest.raises(ConfigError, match="at least one reward"):
        load_config(PPOConfig, None, [*base, f"environment.tools=[{files}/tools.py:add]"])
    with pytest.raises(ConfigError, match="at least one reward"):
        load_config(PPOConfig, None, [*base, f"environment.spec={files}/envs.py:CounterEnv",
                                      "environment.reward_weight=0"])
    with pytest.raises(ConfigError, match=r"environment.tools\[0\]"):
        load_config(PPOConfig, None, [f"environment.tools=[{files}/tools.py:untyped]"])


def test_align_ppo_exits_2_on_a_bad_environment(files, capsys):
    config = files / "run.yaml"
    config.write_text(f"output_dir: {files / 'out'}\nenvironment:\n"
                      f"  spec: {files}/absent.py:Env\n")
    code = main(["ppo", str(config), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "environment.spec" in err and "absent.py" in err and "does not exist" in err
    assert "Traceback" not in err
    assert not (files / "out").exists()

"""Load and check a config's environment: a class, tool functions, or both.

``environment.spec`` names a class (``FILE.py:ClassName`` or ``module:ClassName``) written in
one of two forms:

- TRL's ``environment_factory`` form (protocol ``tools``): ``reset(self, **row)`` returns None
  or text; every other public method listed on the class (``inspect.isfunction``, name not
  starting with ``_``) is a tool whose JSON schema comes from its name, type hints and
  docstring (``transformers.utils.get_json_schema``); an optional ``get_reward()``, sync or
  ``async``, scores the finished episode.
- a subclass of ``align.episodes.TurnEnvironment`` (protocol ``turns``): the model's text is
  the action, ``step`` answers it; no tools.

``environment.tools`` adds plain tool functions (``FILE.py:fn`` or ``module:fn``), alone or
beside a ``tools`` class. Everything is checked here, once, on the driver, before any actor
starts: a file, module, class or function that does not exist, a class without ``reset``, a
tool without type hints or docstring, two tools of one name, and bounds out of range are each a
ConfigError that names the key. ``EnvironmentSpec.new()`` then makes one fresh instance per
episode; instances are never shared.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.episodes.executor import run_awaitable
from align.episodes.turns import Step, TurnEnvironment
from align.errors import ConfigError, EpisodeError
from align.user_code import load_object

_NOT_TOOLS = ("reset", "get_reward")


@dataclass(frozen=True)
class Tool:
    """One tool the model may call.

    Attributes:
        name: The name the model calls it by.
        schema: ``{"type": "function", "function": {"name", "description", "parameters"}}``.
        is_async: Whether calling it returns an awaitable (``async def``).
        function: The tool function, or for a method the function defined on the class.
        method: For a method of the environment class, its attribute name (bound per episode).
    """

    name: str
    schema: dict
    is_async: bool
    function: Callable = field(compare=False, repr=False)
    method: str | None = None


class EnvironmentSpec:
    """A checked environment: what ``apply_chat_template(tools=...)`` gets, and a factory.

    Attributes:
        name: The class name, or ``"tools"`` when only tool functions are given.
        protocol: ``tools`` (tool calls; TRL's form, or tool functions alone) or ``turns``
            (a TurnEnvironment).
        schemas: The tools' JSON schemas ([] for the ``turns`` protocol).
        has_reward: Whether the class defines ``get_reward``.
        env_class: The environment class, or None for tool functions alone.
        tools: The tools by name.
    """

    def __init__(self, env_class: type | None, tools: list[Tool]) -> None:
        self.env_class = env_class
        self.name = env_class.__name__ if env_class is not None else "tools"
        self.protocol: Literal["tools", "turns"] = (
            "turns" if env_class is not None and issubclass(env_class, TurnEnvironment)
            else "tools")
        self.tools = {tool.name: tool for tool in tools}
        self.schemas = [tool.schema for tool in tools]
        self.has_reward = env_class is not None and inspect.isfunction(
            getattr(env_class, "get_reward", None))

    def new(self) -> EpisodeEnv:
        """A fresh environment for one episode (never shared with another).

        Raises:
            EpisodeError: When the class's constructor raises.
        """
        if self.env_class is None:
            return EpisodeEnv(self, None)
        try:
            instance = self.env_class()
        except Exception as err:  # user code: report it with its cause
            raise EpisodeError(f"environment {self.name}: {self.name}() raised "
                               f"{type(err).__name__}: {err}") from err
        return EpisodeEnv(self, instance)


class EpisodeEnv:
    """The environment of one episode: one instance of the class (or none, for tool functions
    alone) and the tools bound to it.

    Every method that runs user code raises EpisodeError, naming the environment and the
    method, when that code raises or returns the wrong type.
    """

    def __init__(self, spec: EnvironmentSpec, instance: Any) -> None:
        self.spec = spec
        self.instance = instance  # what reward functions get in their `environments` column

    def reset(self, row: dict) -> str | list[dict] | None:
        """Start the episode: ``instance.reset(**row)`` (awaited if it is a coroutine).

        Args:
            row: The prompt row's columns other than the prompt.

        Returns:
            Text appended to the last user message, messages appended after the prompt, or
            None (always None for tool functions alone).
        """
        if self.instance is None:
            return None
        value = self._call("reset", **row)
        if value is None or isinstance(value, str) or _is_messages(value):
            return value
        raise EpisodeError(f"environment {self.spec.name}: reset() returned a value of type "
                           f"{type(value).__name__}; expected None, text, or a list of "
                           "messages ({'role': ..., 'content': ...})")

    def tool(self, name: str) -> tuple[Callable, bool] | None:
        """The tool the model called by ``name``: ``(callable, is_async)``, or None if unknown."""
        tool = self.spec.tools.get(name)
        if tool is None:
            return None
        if tool.method is None:
            return tool.function, tool.is_async
        return getattr(self.instance, tool.method), tool.is_async

    def step(self, action: str) -> Step:
        """Answer one model turn (``turns`` protocol only).

        Raises:
            TypeError: For an environment of the ``tools`` protocol.
            EpisodeError: When ``step`` raises or does not return a Step.
        """
        if self.spec.protocol != "turns":
            raise TypeError(f"environment {self.spec.name} answers tool calls; step() is for "
                            "TurnEnvironment subclasses")
        value = self._call("step", action)
        if not isinstance(value, Step):
            raise EpisodeError(f"environment {self.spec.name}: step() returned a value of type "
                               f"{type(value).__name__}; expected align.episodes.Step")
        return value

    def reward(self) -> float | None:
        """The finished episode's ``get_reward()`` (awaited if async); None without one, or
        when it returns None."""
        if not self.spec.has_reward:
            return None
        value = self._call("get_reward")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EpisodeError(f"environment {self.spec.name}: get_reward() returned "
                               f"{value!r}; expected a number (or None)")
        return float(value)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return run_awaitable(getattr(self.instance, method)(*args, **kwargs))
        except Exception as err:  # user code: re-raise with the environment and method named
            raise EpisodeError(f"environment {self.spec.name}: {method}() raised "
                               f"{type(err).__name__}: {err}") from err


def load_environment(cfg: Any, key: str | Mapping[str, str] = "environment",
                     base_dir: str | Path | None = None) -> EnvironmentSpec | None:
    """Load and check ``cfg``'s environment class and tool functions.

    Args:
        cfg: The ``environment`` section of a PPO config (``align.config.EnvironmentConfig``;
            not imported here, as ``align.config`` calls this from its checks).
        key: Where ``cfg`` sits in the config, for messages; or, for a command line, the
            option that sets each field (``{"spec": "--environment", ...}``).
        base_dir: Folder that relative file paths resolve against (default: the current
            directory, as for reward functions).

    Returns:
        The checked spec, or None when ``cfg`` names neither a class nor tools.

    Raises:
        ConfigError: Naming the key (``environment.spec``, ``environment.tools[1]``,
            ``environment.max_turns``, ...) and what is wrong with it.
    """
    if not cfg.enabled:
        return None
    check_bounds(cfg, key)
    base = Path(base_dir if base_dir is not None else Path.cwd()).expanduser().resolve()
    env_class, tools, origin = None, [], {}
    if cfg.spec:
        where = f"{_name(key, 'spec')} {cfg.spec!r}"
        env_class = load_object(cfg.spec, base, where, kind="class")
        tools = _class_tools(env_class, where)
        origin = {tool.name: f"{_name(key, 'spec')} (method {tool.method}())" for tool in tools}
        if issubclass(env_class, TurnEnvironment) and cfg.tools:
            raise ConfigError(f"{_name(key, 'tools')}: {env_class.__name__} is a "
                              "TurnEnvironment, which reads the model's text, not tool calls; "
                              "drop the tools or use an environment class in TRL's form")
    for i, target in enumerate(cfg.tools):
        where = f"{_name(key, 'tools', i)} {target!r}"
        tool = _function_tool(load_object(target, base, where), where)
        if tool.name in origin:
            raise ConfigError(f"{where}: a tool named {tool.name!r} is already given by "
                              f"{origin[tool.name]}; the model calls tools by name, so names "
                              "must be unique")
        origin[tool.name] = where
        tools.append(tool)
    return EnvironmentSpec(env_class, tools)


def check_bounds(cfg: Any, key: str | Mapping[str, str] = "environment") -> None:
    """Refuse budgets, timeouts and fractions of an ``EnvironmentConfig`` that cannot work,
    naming the key."""
    at_least_one = {"max_turns": cfg.max_turns, "max_episode_tokens": cfg.max_episode_tokens,
                    "max_tool_output_tokens": cfg.max_tool_output_tokens,
                    "max_concurrent_tools": cfg.max_concurrent_tools}
    if cfg.max_tokens_per_turn is not None:
        at_least_one["max_tokens_per_turn"] = cfg.max_tokens_per_turn
    for name, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{_name(key, name)} must be at least 1; got {value}")
    for name in ("tool_timeout_s", "episode_timeout_s"):
        value = getattr(cfg, name)
        if not 0 < value < math.inf:
            raise ConfigError(f"{_name(key, name)} must be a positive number of seconds; got "
                              f"{value}")
    if not 0 <= cfg.max_infra_failure_fraction <= 1:
        raise ConfigError(f"{_name(key, 'max_infra_failure_fraction')} must lie in [0, 1]; got "
                          f"{cfg.max_infra_failure_fraction}")
    if not math.isfinite(cfg.reward_weight):
        raise ConfigError(f"{_name(key, 'reward_weight')} must be finite; got {cfg.reward_weight}")


def _name(key: str | Mapping[str, str], field: str, index: int | None = None) -> str:
    """How a message names ``field``: ``key.field`` (``key.tools[index]``) in a config, or
    the command-line option that ``key`` maps it to."""
    if isinstance(key, str):
        return f"{key}.{field}" + ("" if index is None else f"[{index}]")
    return key.get(field, f"environment.{field}")


def check_tool_template(tokenizer: Any, spec: EnvironmentSpec | None,
                        key: str = "model.chat_template") -> None:
    """Refuse a chat template that cannot render tool calls when the environment has tools.

    The template must render a ``user -> assistant (tool_calls) -> tool`` conversation with the
    call's name, arguments and the tool's answer all present
    (``trl.chat_template_utils.supports_tool_calling``). Nothing is checked for the ``turns``
    protocol or an environment without tools.

    Args:
        key: The setting that chose the template, named in the message (``--chat-template``
            on the command line).

    Raises:
        ConfigError: Naming ``key``.
    """
    if spec is None or spec.protocol == "turns" or not spec.schemas:
        return
    from trl.chat_template_utils import supports_tool_calling

    try:
        supported = supports_tool_calling(tokenizer)
    except Exception as err:  # a template that fails in another way: say how
        raise ConfigError(f"{key}: rendering a tool-calling conversation failed "
                          f"({type(err).__name__}: {err})") from err
    if not supported:
        raise ConfigError(
            f"{key}: environment {spec.name} gives the model tools, but the chat template "
            "cannot render a tool-calling conversation (user -> assistant with tool_calls -> "
            "tool: the call's name, arguments and the tool's answer must all appear); set "
            f"{key} to one that renders tool_calls and tool messages, such as Qwen2.5's")


def _class_tools(env_class: type, where: str) -> list[Tool]:
    """Check an environment class and list its tools (none for a TurnEnvironment)."""
    name = env_class.__name__
    if issubclass(env_class, TurnEnvironment):
        if inspect.isabstract(env_class):
            missing = ", ".join(sorted(env_class.__abstractmethods__))
            raise ConfigError(f"{where}: {name} subclasses TurnEnvironment but does not define "
                              f"{missing}")
        _check_constructor(env_class, where)
        return []
    members = dict(inspect.getmembers(env_class, predicate=inspect.isfunction))
    if "reset" not in members:
        raise ConfigError(f"{where}: class {name} has no reset() method; an environment class "
                          "needs reset(self, **row) returning None or text (TRL's form), or "
                          "must subclass align.episodes.TurnEnvironment")
    _check_constructor(env_class, where)
    tools = []
    for attr, function in members.items():
        if attr.startswith("_") or attr in _NOT_TOOLS:
            continue
        schema = _schema(function, f"{where}: method {attr}()")
        tools.append(Tool(schema["function"]["name"], schema,
                          inspect.iscoroutinefunction(function), function, method=attr))
    names = [tool.name for tool in tools]
    for tool in tools:
        if names.count(tool.name) > 1:
            raise ConfigError(f"{where}: two methods of {name} are both the tool "
                              f"{tool.name!r}; tool names must be unique")
    return tools


def _function_tool(function: Callable, where: str) -> Tool:
    schema = _schema(function, where)
    return Tool(schema["function"]["name"], schema, inspect.iscoroutinefunction(function),
                function)


def _schema(function: Callable, where: str) -> dict:
    """The tool's JSON schema, or a ConfigError saying what it lacks."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(function)
    except Exception as err:  # transformers' own exceptions name the argument or docstring
        raise ConfigError(
            f"{where} cannot be a tool: {err}. A tool needs a type hint on every argument and "
            "a Google-style docstring describing it (Args: name: description), as "
            "transformers.utils.get_json_schema reads them; prefix a helper's name with _ to "
            "keep it from the model") from err


def _check_constructor(env_class: type, where: str) -> None:
    """One instance is made per episode as ``Class()``: refuse required constructor arguments."""
    try:
        signature = inspect.signature(env_class)
    except (TypeError, ValueError):  # no signature to read (a builtin base): try at new()
        return
    try:
        signature.bind()
    except TypeError as err:
        raise ConfigError(f"{where}: {env_class.__name__}() must take no arguments (one instance "
                          f"is made per episode): {err}") from err


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m for m in value)

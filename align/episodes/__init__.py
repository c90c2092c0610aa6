"""Multi-turn, tool-using episodes: environments, tools, tool-call parsing and execution.

An episode alternates the model's sampled turns with tool or environment turns until done or
out of budget (docs/environments.md). This package's top level imports nothing heavy
(transformers and trl load only when a spec is checked).

- ``environment``: load and check ``environment.spec`` / ``environment.tools``
  (``load_environment``), one instance per episode (``EnvironmentSpec.new``).
- ``turns``: the gym-style protocol (``TurnEnvironment``, ``Step``).
- ``tool_calls``: read tool calls from a model turn (``parse_turn``).
- ``executor``: run tool calls concurrently under a timeout and a cap (``ToolExecutor``).
"""

from align.episodes.environment import (
    EnvironmentSpec,
    EpisodeEnv,
    Tool,
    check_tool_template,
    load_environment,
)
from align.episodes.executor import ToolExecutor, ToolResult
from align.episodes.tool_calls import ParsedTurn, ToolCall, parse_turn
from align.episodes.turns import Step, TurnEnvironment

__all__ = ["EnvironmentSpec", "EpisodeEnv", "ParsedTurn", "Step", "Tool", "ToolCall",
           "ToolExecutor", "ToolResult", "TurnEnvironment", "check_tool_template",
           "load_environment", "parse_turn"]

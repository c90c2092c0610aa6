"""The calculator of the embedded tool task (`align.tasks.products`), as an environment class in
TRL's `environment_factory` form: one instance per episode, `reset(**row)` called with the
prompt row's other columns, and every other public method a tool whose name, type hints and
Google-style docstring give its JSON schema (`transformers.utils.get_json_schema`).

    environment:
      spec: align.tasks.calculator:Calculator

It defines no `get_reward`: the task's reward is exact match of the final answer
(`reward_models.builtin:exact_match` against the row's `answer`).
"""

from __future__ import annotations

import inspect
from typing import Any


class Calculator:
    """Multiplies integers for the model; holds no state between calls."""

    def reset(self, **kwargs: Any) -> str | None:
        """Start an episode; the row's columns (the `answer` among them) are not looked at,
        and nothing is added to the prompt."""
        return None

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: first factor
            b: second factor
        """
        return a * b


def tool_schemas() -> list[dict]:
    """The calculator's tools as `apply_chat_template(tools=...)` takes them: the JSON schema of
    each public method but `reset` (and `get_reward`), by name, as TRL's GRPOTrainer lists an
    environment's tools."""
    from transformers.utils import get_json_schema  # imports transformers: only when asked

    calculator = Calculator()
    return [get_json_schema(getattr(calculator, name))
            for name, _ in inspect.getmembers(Calculator, predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")]

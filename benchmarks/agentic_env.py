"""The environment of `agentic_vs_trl.py`, written in TRL's `environment_factory` form.

One instance per episode (TRL pools and resets instances; align makes a new one for each
episode): `reset(**row)` reads the row's numbers, the two public methods are the tools (their
type hints and docstrings give the JSON schema), and `get_reward` scores the finished episode.
Both trainers receive this very class, unchanged.
"""

from __future__ import annotations


class Adder:
    """Add two numbers with the `add` tool, then submit the sum with `answer`.

    Reward: 0.5 when `add` was called with the row's two numbers (in either order), plus 0.5
    when the first value passed to `answer` is their sum.
    """

    def __init__(self) -> None:
        self.a = self.b = 0
        self.added_right = False
        self.answered: int | None = None

    def reset(self, a: int = 0, b: int = 0, **row) -> str | None:
        self.a, self.b = int(a), int(b)
        self.added_right = False
        self.answered = None
        return None  # the prompt already names the numbers

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        if sorted((a, b)) == sorted((self.a, self.b)):
            self.added_right = True
        return a + b

    def answer(self, value: int) -> str:
        """Submit the final answer.

        Args:
            value: The answer.
        """
        if self.answered is None:
            self.answered = value
        return "Recorded."

    def get_reward(self) -> float:
        return 0.5 * self.added_right + 0.5 * (self.answered == self.a + self.b)

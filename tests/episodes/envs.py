"""Environments and tools in TRL's documented `environment_factory` form, for the tests."""

from __future__ import annotations

import asyncio
import time

from align.episodes import Step, TurnEnvironment

INSTANCES: list = []  # every Calculator made, in order (one per episode)


class Calculator:
    """A calculator the model can call; counts its calls."""

    def __init__(self):
        self.calls = 0
        INSTANCES.append(self)

    def reset(self, **kwargs) -> str | None:
        self.calls = 0
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls += 1
        return a + b

    async def shout(self, text: str) -> str:
        """Repeat a text in capitals.

        Args:
            text: What to repeat.
        """
        await asyncio.sleep(0)
        return text.upper()

    def fail(self, reason: str) -> str:
        """Always raise.

        Args:
            reason: The error message.
        """
        raise ValueError(reason)

    def hang(self, seconds: float) -> str:
        """Sleep for a while.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "woke"

    def get_reward(self) -> float:
        return float(self.calls)


class Crashing(Calculator):
    """reset raises for the row whose `crash` column is true."""

    def reset(self, crash: bool = False, **kwargs) -> str | None:
        if crash:
            raise RuntimeError("the environment's backend is down")
        return " (use the tools)"


class Guess(TurnEnvironment):
    """Guess a number: each wrong guess is told higher/lower, reward 1 on the right one."""

    def reset(self, target: int = 3, **row) -> str:
        self.target = target
        return None

    def step(self, action: str) -> Step:
        guess = int(action.split()[-1]) if action.split() else 0  # after any reasoning
        if guess == self.target:
            return Step(None, reward=1.0, done=True)
        return Step("higher" if guess < self.target else "lower", reward=-0.1)


def ascii_share(text: str) -> float:
    return sum(" " <= ch <= "~" for ch in text) / max(len(text), 1)


class Chatter(TurnEnvironment):
    """Three turns of chat: each of the model's turns is rewarded by its share of printable
    ASCII characters (a per-turn reward), the user says "more" in between."""

    def reset(self, **row) -> None:
        self.turn = 0

    def step(self, action: str) -> Step:
        self.turn += 1
        return Step("more", reward=ascii_share(action), done=self.turn == 3)


def multiply(a: int, b: int) -> int:
    """Multiply two integers (a plain tool function).

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b

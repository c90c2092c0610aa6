"""The gym-style protocol: environments that read the model's text rather than tool calls.

A game, a puzzle checker or a simulated user for multi-turn chat subclasses
``TurnEnvironment``. Each model turn's text is the action; the environment answers with a
``Step``: an observation, a reward for that turn, and whether the episode is over::

    class Guess(TurnEnvironment):
        def reset(self, answer: int, **row) -> str:
            self.answer = answer
            return "Guess a number from 1 to 100."

        def step(self, action: str) -> Step:
            guess = int(action.strip()) if action.strip().isdigit() else None
            if guess == self.answer:
                return Step(reward=1.0, done=True)
            return Step(observation="higher" if (guess or 0) < self.answer else "lower")

One instance serves one episode. The observation text is appended as a ``{"role": "user"}``
message (a list of messages is appended as it is); ``Step.reward`` is placed on the last token
of the model turn it answers; the optional ``get_reward()`` scores the whole episode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class Step:
    """What an environment answers to one model turn.

    Attributes:
        observation: Text appended as a user message, a list of messages appended as they
            are, or None for nothing (usual when ``done``).
        reward: The reward of the model turn this step answers.
        done: Whether the episode ends here.
    """

    observation: str | list[dict] | None = None
    reward: float = 0.0
    done: bool = False


class TurnEnvironment(ABC):
    """An environment driven by the model's text, one instance per episode.

    Subclasses implement ``reset`` and ``step`` and may define ``get_reward() -> float`` (sync
    or ``async``) to score the finished episode. Their other methods are not tools: the model's
    whole turn is the action.
    """

    @abstractmethod
    def reset(self, **row) -> str | list[dict] | None:
        """Start an episode.

        Args:
            **row: The prompt row's columns other than the prompt.

        Returns:
            Text appended to the last user message of the prompt, a list of messages appended
            after the prompt, or None for nothing.
        """

    @abstractmethod
    def step(self, action: str) -> Step:
        """Answer one model turn.

        Args:
            action: The text of the model's turn (special tokens removed).

        Returns:
            The observation, this turn's reward, and whether the episode is over.
        """

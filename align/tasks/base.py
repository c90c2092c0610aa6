"""The task interface: what a built-in verifiable task gives every stage.

A task generates its own rows (no download): SFT demonstrations, preference pairs and RL
prompts from its training split, and held-out rows from a split never trained on, plus the
evaluator that scores a completion against a held-out answer. Trainers reach a task only
through `stage_rows` / `load_task` (see `align.tasks`), so a new task needs no trainer change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

RowKind = Literal["sft", "preference", "rl"]


@dataclass
class TaskRows:
    """One stage's rows from a task: training rows, held-out rows, and their source names."""

    train: list[dict]
    held_out: list[dict]
    train_name: str  # e.g. "embedded:arithmetic", shown in data errors
    held_out_name: str  # e.g. "embedded:arithmetic(held-out)"


class Task(ABC):
    """A verifiable task. Row shapes follow the data conventions of every stage:
    SFT `{prompt, completion}` or `{messages}` (with a `tools` column where tools are offered),
    preference `{prompt, chosen, rejected}`, RL and held-out `{prompt, answer}` (the `answer`
    column reaches reward functions)."""

    name: str = "task"

    @abstractmethod
    def sft_rows(self) -> list[dict]:
        """Training demonstrations, in a shape SFT accepts (`align.data.sft`)."""

    def held_out_sft_rows(self) -> list[dict]:
        """Held-out demonstrations: each held-out prompt with its correct completion
        (`reference_completion` of its answer), `{prompt, completion}`."""
        return [{"prompt": r["prompt"], "completion": self.reference_completion(r["answer"])}
                for r in self.held_out_rows()]

    @abstractmethod
    def preference_rows(self) -> list[dict]:
        """Training pairs `{prompt, chosen, rejected}`."""

    @abstractmethod
    def held_out_preference_rows(self) -> list[dict]:
        """Held-out pairs, on prompts never trained on."""

    @abstractmethod
    def rl_rows(self) -> list[dict]:
        """Training prompts with their answers `{prompt, answer}`."""

    @abstractmethod
    def held_out_rows(self) -> list[dict]:
        """Held-out prompts with their answers `{prompt, answer}`."""

    @abstractmethod
    def reference_completion(self, answer: str) -> str:
        """The completion text a correct demonstration of `answer` has."""

    def is_correct(self, completion: str, answer: str) -> bool:
        """The evaluator: exact match after stripping surrounding white space."""
        return completion.strip() == answer.strip()

    def accuracy(self, completions: list[str], answers: list[str]) -> float:
        """Share of completions the evaluator accepts (0 for no answers)."""
        if not answers:
            return 0.0
        return sum(self.is_correct(c, a) for c, a in zip(completions, answers)) / len(answers)

    def rows(self, kind: RowKind) -> TaskRows:
        """The training and held-out rows of one stage kind."""
        train_name, held_name = f"embedded:{self.name}", f"embedded:{self.name}(held-out)"
        if kind == "sft":
            return TaskRows(self.sft_rows(), self.held_out_sft_rows(), train_name, held_name)
        if kind == "preference":
            return TaskRows(self.preference_rows(), self.held_out_preference_rows(),
                            train_name, held_name)
        return TaskRows(self.rl_rows(), self.held_out_rows(), train_name, held_name)

"""One episode's record: the prompt, then model turns and environment turns as token segments.

The token stream the trainer sees is the prompt's ids followed by every segment's ids, in order.
A model segment holds exactly the tokens the rollout engine sampled, with the log-prob it
sampled each with; an environment segment (a tool's output, an observation, and the template
tokens between turns) is tokenised through the chat template and is never trained on.
`check_invariants` holds this on every episode before it reaches the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL, ENV = "model", "env"  # segment kinds: sampled by the engine, or tokenised from the env


@dataclass
class Segment:
    kind: str  # MODEL or ENV
    ids: list[int]
    logprobs: list[float] | None = None  # MODEL: the engine's log-prob of each sampled token
    reward: float = 0.0  # MODEL: the per-turn reward for this turn (placed on its last token)


@dataclass
class Drift:
    """Where the re-rendered conversation first differs from the token stream trained on."""

    index: int  # position in the stream (prompt included)
    turn: int  # model turn the position falls in or after (0: the prompt)
    trained: list[int]  # a few stream tokens from `index`
    rendered: list[int]  # the rendered conversation's tokens from `index`

    def describe(self) -> str:
        where = "the prompt" if self.turn == 0 else f"turn {self.turn}"
        return (f"in {where}, at token {self.index}: trained on {self.trained}, the chat "
                f"template renders {self.rendered}")


@dataclass
class Episode:
    """A finished (or abandoned) episode and what happened in it."""

    prompt_ids: list[int]
    messages: list[dict]  # the conversation, prompt included, as a user would render it
    segments: list[Segment] = field(default_factory=list)
    truncated: bool = False  # a budget ended it (turns, tokens, a turn without EOS)
    tool_calls: int = 0
    tool_errors: int = 0  # calls that raised, named no known tool, or did not parse
    tool_seconds: float = 0.0
    tool_outputs_cut: int = 0  # tool/environment turns cut to environment.max_tool_output_tokens
    infra_error: str | None = None  # timeout or crash of the environment: dropped from training
    drift: Drift | None = None
    env_reward: float | None = None  # the environment's get_reward(), where it has one
    env: Any = None  # the episode's environment instance (for rewards); not saved
    done: bool = False
    prompt_messages: int = 0  # how many of `messages` are the prompt (reset text included)
    reencodes: bool = False  # a model turn's tokens are not the encoding of its text

    @property
    def ids(self) -> list[int]:
        """Tokens after the prompt."""
        return [t for s in self.segments for t in s.ids]

    @property
    def mask(self) -> list[int]:
        """1 on every token the model sampled, 0 on environment tokens."""
        return [int(s.kind == MODEL) for s in self.segments for _ in s.ids]

    @property
    def logprobs(self) -> list[float]:
        """The engine's log-prob of each model token; 0.0 on environment tokens."""
        return [p for s in self.segments
                for p in (s.logprobs if s.kind == MODEL else [0.0] * len(s.ids))]

    @property
    def completion_messages(self) -> list[dict]:
        """The messages after the prompt: TRL's conversational completion."""
        return self.messages[self.prompt_messages:]

    @property
    def turns(self) -> int:
        return sum(s.kind == MODEL for s in self.segments)

    @property
    def model_ids(self) -> list[int]:
        return [t for s in self.segments if s.kind == MODEL for t in s.ids]

    @property
    def final_text(self) -> str:
        """The content of the last model turn (what a plain reward function scores)."""
        for message in reversed(self.messages):
            if message["role"] == "assistant":
                return message["content"]
        return ""

    def turn_rewards(self) -> list[tuple[int, float]]:
        """(index after the prompt of a model turn's last token, its reward), per model turn
        with a non-zero reward."""
        out, at = [], 0
        for s in self.segments:
            at += len(s.ids)
            if s.kind == MODEL and s.reward and s.ids:
                out.append((at - 1, s.reward))
        return out

    def env_tokens(self) -> int:
        return sum(len(s.ids) for s in self.segments if s.kind == ENV)

    def to_state(self) -> dict[str, Any]:
        """The episode as JSON (its environment instance left out)."""
        return {"prompt_ids": self.prompt_ids, "messages": self.messages,
                "segments": [[s.kind, s.ids, s.logprobs, s.reward] for s in self.segments],
                "truncated": self.truncated, "tool_calls": self.tool_calls,
                "tool_errors": self.tool_errors, "tool_seconds": self.tool_seconds,
                "tool_outputs_cut": self.tool_outputs_cut, "infra_error": self.infra_error,
                "drift": None if self.drift is None else vars(self.drift),
                "env_reward": self.env_reward, "prompt_messages": self.prompt_messages,
                "reencodes": self.reencodes}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Episode:
        segments = [Segment(k, ids, lp, r) for k, ids, lp, r in state["segments"]]
        drift = None if state["drift"] is None else Drift(**state["drift"])
        return cls(state["prompt_ids"], state["messages"], segments, state["truncated"],
                   state["tool_calls"], state["tool_errors"], state["tool_seconds"],
                   state["tool_outputs_cut"], state["infra_error"], drift,
                   state["env_reward"], done=True,
                   prompt_messages=state["prompt_messages"],
                   reencodes=state.get("reencodes", False))


class InvariantError(AssertionError):
    """An episode whose trained tokens are not what the engine sampled."""


def check_invariants(episode: Episode) -> None:
    """Every mask-1 token came from the engine with its log-prob; environment tokens carry
    none; the stream starts with a model turn.

    Raises:
        InvariantError: naming the segment that breaks it.
    """
    for number, s in enumerate(episode.segments):
        if s.kind == MODEL:
            if s.logprobs is None or len(s.logprobs) != len(s.ids):
                raise InvariantError(f"model segment {number} has {len(s.ids)} tokens but "
                                     f"{'no' if s.logprobs is None else len(s.logprobs)} "
                                     "engine log-probs")
        elif s.kind == ENV:
            if s.logprobs is not None or s.reward:
                raise InvariantError(f"environment segment {number} carries log-probs or a "
                                     "reward")
        else:
            raise InvariantError(f"segment {number} is of unknown kind {s.kind!r}")
    if episode.segments and episode.segments[0].kind != MODEL:
        raise InvariantError("an episode's first segment after the prompt must be the model's")

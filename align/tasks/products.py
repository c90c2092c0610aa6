"""The embedded tool task: `What is 4821 times 37?` -> `178377`, with a calculator tool.

Products of a four-digit and a two-digit number are beyond the small model, but with the
calculator (`align.tasks.calculator`) every answer is one tool call away: the model writes
`<tool_call>\n{"name": "multiply", "arguments": {"a": 4821, "b": 37}}\n</tool_call>`, reads
the result in a `<tool_response>` and copies it as its answer. The format is Qwen2.5's (Hermes);
the embedded model renders it with `model.embedded.chat_format: chatml`. Both factors have a
fixed width, and so has their product (six digits), so every digit the model copies sits at
a fixed distance from its source (`question`).

Factor pairs are split once, by seed, into training and held-out pairs, so accuracy is always
measured on products never seen in training. SFT rows are whole conversations with a `tools`
column, as TRL's SFT datasets carry them: the question, the assistant's tool call, the tool's
result, the answer. They are imperfect in a systematic, prompt-dependent way, like human ones:
when the second factor is a multiple of ten (half the prompts) the product looks easy, and the
demonstrator skips the calculator with probability `tool_skip_prob` and writes an estimate
(`about 140000` for 4821 times 30), which exact match never accepts. SFT learns to estimate
on those prompts and so plateaus near the share of the others; RL, which sees the true answers,
finds that the calls it still samples there pay. RL and held-out rows are conversational
prompts `{prompt: [{role: user, content}], answer}`.
"""

from __future__ import annotations

import random

from align.config import TaskConfig
from align.errors import ConfigError
from align.tasks.base import Task
from align.tasks.calculator import tool_schemas
from reward_models.builtin import clean_completion

MIN_FIRST, MAX_FIRST = 1000, 9999  # the first factor: four digits
MIN_SECOND, MAX_SECOND = 11, 99  # the second: two digits, a multiple of ten half the time
MIN_PRODUCT = 100_000  # products have six digits
TOOL = "multiply"

Pair = tuple[int, int]


def question(a: int, b: int) -> str:
    """The user's question. ` times ` is as long as `, "b": `, what separates the factors in
    the tool call, so every digit of the call sits at one distance from its source."""
    return f"What is {a} times {b}?"


def looks_easy(a: int, b: int) -> bool:
    """The prompts on which the demonstrator is tempted to skip the tool: a round factor."""
    return b % 10 == 0


def draw_pair(rng: random.Random) -> Pair:
    """A four-digit and a two-digit factor whose product has six digits; the second factor is a
    multiple of ten half the time."""
    round_second = rng.random() < 0.5
    while True:
        if round_second:
            second = 10 * rng.randint(MIN_SECOND // 10 + 1, MAX_SECOND // 10)
        else:
            second = rng.choice([b for b in range(MIN_SECOND, MAX_SECOND + 1) if b % 10])
        first = rng.randint(MIN_FIRST, MAX_FIRST)
        if first * second >= MIN_PRODUCT:
            return first, second


def held_out_pairs(cfg: TaskConfig) -> list[Pair]:
    """`num_eval` distinct pairs chosen by `seed`, never trained on."""
    rng, pairs = random.Random(cfg.seed), {}
    while len(pairs) < cfg.num_eval:
        pairs.setdefault(draw_pair(rng), None)
    return list(pairs)


def training_pairs(cfg: TaskConfig, num: int, stream: int) -> list[Pair]:
    """`num` pairs outside the held-out ones, drawn by `seed` (`stream` tells the row kinds'
    draws apart)."""
    held = set(held_out_pairs(cfg))
    rng, pairs = random.Random(cfg.seed * 1000 + stream), []
    while len(pairs) < num:
        pair = draw_pair(rng)
        if pair not in held:
            pairs.append(pair)
    return pairs


def tool_call(a: int, b: int) -> dict:
    """The assistant turn that calls the calculator, with structured `tool_calls`."""
    call = {"type": "function", "function": {"name": TOOL, "arguments": {"a": a, "b": b}}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def tool_call_text(a: int, b: int) -> str:
    """The text of that turn as the model writes it (what the chat template renders)."""
    return f'<tool_call>\n{{"name": "{TOOL}", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>'


def conversation(a: int, b: int, guess: str | None = None) -> list[dict]:
    """The demonstration of a * b: the tool call, its result and the answer; with `guess`, that
    answer written at once instead (no tool)."""
    user = {"role": "user", "content": question(a, b)}
    if guess is not None:
        return [user, {"role": "assistant", "content": guess}]
    return [user, tool_call(a, b), {"role": "tool", "name": TOOL, "content": str(a * b)},
            {"role": "assistant", "content": str(a * b)}]


def estimate(a: int, b: int) -> str:
    """What the demonstrator writes when it works an easy-looking product out in its head:
    the product to two significant figures, as an estimate (`about 140000` for 4821 times
    30), never the exact answer the task asks for."""
    true = a * b
    place = 10 ** (len(str(true)) - 2)
    return f"about {round(true / place) * place}"


def demonstration(a: int, b: int, rng: random.Random, skip_prob: float) -> list[dict]:
    """The demonstrator's conversation for a * b: on an easy-looking product it skips the tool
    and writes an estimate with probability `skip_prob`, else it calls the tool."""
    if looks_easy(a, b) and rng.random() < skip_prob:
        return conversation(a, b, estimate(a, b))
    return conversation(a, b)


def sft_rows(cfg: TaskConfig) -> list[dict]:
    """`num_train` demonstrations `{messages, tools}` on training pairs."""
    rng, tools = random.Random(cfg.seed * 1000 + 1), tool_schemas()
    return [{"messages": demonstration(a, b, rng, cfg.tool_skip_prob), "tools": tools}
            for a, b in training_pairs(cfg, cfg.num_train, 1)]


def prompt_row(a: int, b: int) -> dict:
    return {"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a * b)}


def is_correct(completion: str | list[dict], answer: str) -> bool:
    """Exact match of the final answer: the completion text, or the content of the last
    assistant message of an episode (never a tool's output), is the product alone."""
    return clean_completion(completion) == answer.strip()


class ProductsTask(Task):
    """The task above behind the `Task` interface, sized by the run's `task` settings. It has
    SFT and RL rows; its preference rows do not exist (its stages are SFT and GRPO)."""

    name = "products"

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    def sft_rows(self) -> list[dict]:
        return sft_rows(self.cfg)

    def held_out_sft_rows(self) -> list[dict]:
        """The correct tool-using conversation of every held-out pair (held-out loss)."""
        tools = tool_schemas()
        return [{"messages": conversation(a, b), "tools": tools}
                for a, b in held_out_pairs(self.cfg)]

    def preference_rows(self) -> list[dict]:
        raise self._no_pairs()

    def held_out_preference_rows(self) -> list[dict]:
        raise self._no_pairs()

    def rl_rows(self) -> list[dict]:
        return [prompt_row(a, b) for a, b in training_pairs(self.cfg, self.cfg.num_train, 2)]

    def held_out_rows(self) -> list[dict]:
        return [prompt_row(a, b) for a, b in held_out_pairs(self.cfg)]

    def reference_completion(self, answer: str) -> str:
        return answer

    def is_correct(self, completion: str | list[dict], answer: str) -> bool:
        return is_correct(completion, answer)

    def _no_pairs(self) -> ConfigError:
        return ConfigError(f"task.name={self.name} has SFT and RL rows only (align sft, align "
                           "ppo); preference stages (rm, dpo) need task.name=arithmetic or "
                           "data.train files")

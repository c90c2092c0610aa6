"""The embedded arithmetic task: `Q: 23+58=` -> ` 81`, with imperfect demonstrations.

Operand pairs (a, b) of two-digit numbers (10..99: a fixed layout, which small models learn
far faster than mixed widths) are split once, by seed, into training and held-out
pairs, so accuracy is always measured on sums never seen in training. The SFT demonstrations
are imperfect in a systematic way, like human ones: when the units digits carry, the label
drops the carry (true sum - 10) with probability `carry_drop_prob`. SFT therefore plateaus
well below 100%, leaving room for the preference and RL stages, which see true answers.
"""

from __future__ import annotations

import random

from align.config import TaskConfig
from align.tasks.base import Task

MIN_OPERAND, MAX_OPERAND = 10, 99


def prompt(a: int, b: int) -> str:
    return f"Q: {a}+{b}="


def completion(answer: int) -> str:
    return f" {answer}"


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def split_pairs(cfg: TaskConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train pairs, held-out pairs); `num_eval` pairs are held out, chosen by `seed`."""
    span = range(MIN_OPERAND, MAX_OPERAND + 1)
    pairs = [(a, b) for a in span for b in span]
    random.Random(cfg.seed).shuffle(pairs)
    return pairs[cfg.num_eval:], pairs[: cfg.num_eval]


def demonstration(a: int, b: int, rng: random.Random, carry_drop_prob: float) -> int:
    """The (possibly wrong) answer a demonstrator writes for a + b."""
    if carries(a, b) and rng.random() < carry_drop_prob:
        return a + b - 10
    return a + b


def sft_rows(cfg: TaskConfig) -> list[dict]:
    """`num_train` demonstrations `{prompt, completion}` drawn from the training pairs."""
    train, _ = split_pairs(cfg)
    rng = random.Random(cfg.seed + 1)
    rows = []
    for _ in range(cfg.num_train):
        a, b = rng.choice(train)
        rows.append({"prompt": prompt(a, b),
                     "completion": completion(demonstration(a, b, rng, cfg.carry_drop_prob))})
    return rows


def eval_rows(cfg: TaskConfig) -> list[dict]:
    """Held-out prompts with the true answer: `{prompt, answer}`."""
    _, held_out = split_pairs(cfg)
    return [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in held_out]


def rl_rows(cfg: TaskConfig, num: int) -> list[dict]:
    """`num` RL prompts from the training pairs, with ground truth: `{prompt, answer}`."""
    train, _ = split_pairs(cfg)
    rng = random.Random(cfg.seed + 2)
    return [{"prompt": prompt(a, b), "answer": str(a + b)}
            for a, b in (rng.choice(train) for _ in range(num))]


def preference_rows(cfg: TaskConfig, num: int) -> list[dict]:
    """`num` pairs `{prompt, chosen, rejected}`: the true sum against a plausible wrong one.

    With `pair_errors: demonstrator` rejected answers are the demonstrator's typical mistake
    (dropped carry) where the sum carries, and otherwise an off-by-one-to-three answer; every
    wrong tens digit is then lower than the true one, a shortcut a reward model learns in place
    of the carry ("the higher answer wins", which a policy exploits by carrying everywhere).
    With `symmetric`, half the rejected answers have the tens digit off by one in either
    direction (a dropped or a spurious carry) and half are off by one to three.
    """
    train, _ = split_pairs(cfg)
    rng = random.Random(cfg.seed + 3)
    return [_preference_row(*rng.choice(train), rng, cfg.pair_errors) for _ in range(num)]


def held_out_preference_rows(cfg: TaskConfig) -> list[dict]:
    """One pair `{prompt, chosen, rejected}` per held-out operand pair, built as in
    `preference_rows`: pairwise accuracy on sums never seen in training."""
    _, held_out = split_pairs(cfg)
    rng = random.Random(cfg.seed + 4)
    return [_preference_row(a, b, rng, cfg.pair_errors) for a, b in held_out]


def _preference_row(a: int, b: int, rng: random.Random, errors: str) -> dict:
    true = a + b
    if errors == "symmetric" and rng.random() < 0.5:
        wrong = true + rng.choice([-10, 10])
    elif errors == "demonstrator" and carries(a, b) and rng.random() < 0.5:
        wrong = true - 10
    else:
        wrong = true + rng.choice([-3, -2, -1, 1, 2, 3])
        wrong = wrong if wrong >= 0 else true + 1
    return {"prompt": prompt(a, b), "chosen": completion(true), "rejected": completion(wrong)}


def is_correct(completion_text: str, answer: str) -> bool:
    """Exact match: the completion is the answer, alone, after stripping spaces and EOS."""
    return completion_text.strip() == answer.strip()


def accuracy(completions: list[str], answers: list[str]) -> float:
    if not answers:
        return 0.0
    return sum(is_correct(c, a) for c, a in zip(completions, answers)) / len(answers)


class ArithmeticTask(Task):
    """The task above behind the `Task` interface, sized by the run's `task` settings."""

    name = "arithmetic"

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    def sft_rows(self) -> list[dict]:
        return sft_rows(self.cfg)

    def preference_rows(self) -> list[dict]:
        return preference_rows(self.cfg, self.cfg.num_pairs)

    def held_out_preference_rows(self) -> list[dict]:
        return held_out_preference_rows(self.cfg)

    def rl_rows(self) -> list[dict]:
        return rl_rows(self.cfg, self.cfg.num_train)

    def held_out_rows(self) -> list[dict]:
        return eval_rows(self.cfg)

    def reference_completion(self, answer: str) -> str:
        return completion(int(answer))

    def is_correct(self, completion_text: str, answer: str) -> bool:
        return is_correct(completion_text, answer)

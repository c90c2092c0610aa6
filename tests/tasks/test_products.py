"""The embedded tool task: held-out products unseen, demonstrations imperfect only where and as
often as configured, rows in each stage's shape, the calculator in TRL's environment form."""

from __future__ import annotations

import inspect
import re

import pytest

from align.config import SFTConfig, TaskConfig, load_config
from align.errors import ConfigError
from align.tasks import TASKS, load_task, products
from align.tasks.calculator import Calculator, tool_schemas
from align.trainers.stage_data import stage_evaluator

QUESTION = re.compile(r"^What is (\d{4}) times (\d{2})\?$")


def factors(messages: list[dict]) -> tuple[int, int]:
    a, b = QUESTION.match(messages[0]["content"]).groups()
    return int(a), int(b)


def test_held_out_products_never_appear_in_training():
    cfg = TaskConfig(name="products", num_train=4000, num_eval=300)
    held = {factors(r["prompt"]) for r in products.ProductsTask(cfg).held_out_rows()}
    assert len(held) == 300
    task = load_task(cfg)
    for rows in ([r["messages"] for r in task.sft_rows()],
                 [r["prompt"] for r in task.rl_rows()]):
        assert len(rows) == 4000 and not held & {factors(m) for m in rows}
    assert {factors(r["messages"]) for r in task.held_out_sft_rows()} == held


def test_demonstrations_skip_the_tool_on_easy_products_only_at_the_configured_rate():
    cfg = TaskConfig(name="products", num_train=8000, tool_skip_prob=0.75)
    guessed = easy = 0
    task = load_task(cfg)
    for row in task.sft_rows():
        a, b = factors(row["messages"])
        assert row["tools"] == tool_schemas()
        answer = row["messages"][-1]["content"]
        if products.looks_easy(a, b):
            easy += 1
        if len(row["messages"]) == 2:  # answered at once: an estimate, never exact
            assert products.looks_easy(a, b) and b % 10 == 0
            assert answer == products.estimate(a, b)
            assert not task.is_correct(answer, str(a * b))
            estimate = int(answer.removeprefix("about "))
            assert abs(estimate - a * b) <= 0.05 * a * b
            guessed += 1
        else:
            assert row["messages"][1] == products.tool_call(a, b)
            assert row["messages"][2]["content"] == answer == str(a * b)
    assert abs(easy / 8000 - 0.5) < 0.03  # round factors half the time
    assert abs(guessed / easy - 0.75) < 0.03


def test_rows_have_each_stages_shape_and_answers_are_judged_exactly():
    cfg = load_config(SFTConfig, overrides=["task.name=products", "task.num_train=20",
                                            "task.num_eval=10"])
    task = load_task(cfg.task)
    (row,) = task.rl_rows()[:1]
    a, b = factors(row["prompt"])
    assert row == {"prompt": [{"role": "user", "content": products.question(a, b)}],
                   "answer": str(a * b)}
    sft = task.rows("sft")
    assert set(sft.train[0]) == set(sft.held_out[0]) == {"messages", "tools"}
    assert sft.train_name == "embedded:products"
    assert task.is_correct(f" {a * b}\n", row["answer"])
    assert not task.is_correct(f"{a * b}0", row["answer"])
    episode = [{"role": "assistant", "content": products.tool_call_text(a, b)},
               {"role": "tool", "name": "multiply", "content": str(a * b)},
               {"role": "assistant", "content": str(a * b)}]
    assert task.is_correct(episode, row["answer"])
    assert not task.is_correct(episode[:1], row["answer"])
    assert not task.is_correct(episode[:2], row["answer"])  # the tool's output is no answer
    assert stage_evaluator(cfg).__func__ is products.ProductsTask.is_correct
    assert "products" in TASKS
    with pytest.raises(ConfigError, match="task.name=products has SFT and RL rows only"):
        task.rows("preference")


def test_the_calculator_is_an_environment_class_in_trls_form():
    env = Calculator()
    assert env.reset(prompt=[], answer="6") is None
    assert env.multiply(a=4821, b=37) == 178377
    (schema,) = tool_schemas()
    function = schema["function"]
    assert (function["name"], function["description"]) == ("multiply", "Multiply two integers.")
    assert function["parameters"]["required"] == ["a", "b"]
    assert {p["type"] for p in function["parameters"]["properties"].values()} == {"integer"}
    hints = inspect.signature(Calculator.multiply).parameters
    assert [hints[n].annotation for n in ("a", "b")] == ["int", "int"]
    assert not hasattr(Calculator, "get_reward")  # the reward is exact match of the answer

"""Built-in rule rewards on the embedded arithmetic task (``Q: 23+58=`` -> `` 81``)."""

from __future__ import annotations

import pytest

from align.errors import RewardError
from reward_models import builtin, load_reward

PROMPTS = ["Q: 23+58=", "Q: 1+2=", "Q: 99+99=", "Q: 0+0=", "Q: 5+5="]


def test_exact_match_cleans_eos_and_whitespace():
    completions = [" 81</s>", " 4", " 198</s><pad><pad>", "0\n", " 10 </s> 11"]
    answers = [81, "3", "198", "0", None]  # ints compare as strings; None: not applicable
    assert builtin.exact_match(PROMPTS, completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, None]


def test_exact_match_is_strict_about_extra_text():
    assert builtin.exact_match(["Q: 1+2="], [" 3 apples"], answer=["3"]) == [0.0]
    assert builtin.exact_match(["Q: 1+2="], [" 03"], answer=["3"]) == [0.0]


def test_exact_match_chat_format():
    completion = [{"role": "assistant", "content": " 81<|im_end|>"}]
    assert builtin.exact_match(["Q: 23+58="], [completion], answer=["81"]) == [1.0]


def test_exact_match_without_answer_column_names_it():
    reward = load_reward("reward_models.builtin:exact_match")
    with pytest.raises(
        RewardError, match=r"'reward_models.builtin:exact_match'.*needs column\(s\) \['answer'\]"
    ):
        reward(["Q: 1+2="], [" 3"], solution=["3"])


def test_format_reward_digits():
    completions = [" 81</s>", "198", " 1987", "-5", "8.1", "", " eighty"]
    assert builtin.format_reward(PROMPTS, completions) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert builtin.format_reward(PROMPTS, [" 1987"], max_digits=4) == [1.0]


def test_length_penalty_defaults_and_kwargs_spec():
    completions = [" 81</s>", "81 is the sum", "1234"]
    # default: 4 free characters, then -0.1 each ("81 is the sum" has 13 characters)
    assert builtin.length_penalty(PROMPTS, completions) == pytest.approx([0.0, -0.9, 0.0])
    reward = load_reward(
        {
            "spec": "reward_models.builtin:length_penalty",
            "kwargs": {"target_chars": 2, "per_char": 1.0},
        }
    )
    assert reward(PROMPTS[:3], completions) == pytest.approx([0.0, -11.0, -2.0])


def test_clean_completion():
    assert builtin.clean_completion(" 42 <|endoftext|>junk") == "42"
    assert builtin.clean_completion([]) == ""
    # an episode is judged by the model's last turn, never by a tool's output after it
    episode = [{"role": "assistant", "content": "<tool_call>...</tool_call>"},
               {"role": "tool", "name": "multiply", "content": "408"}]
    assert builtin.clean_completion(episode) == "<tool_call>...</tool_call>"
    assert builtin.clean_completion([*episode, {"role": "assistant", "content": " 408"}]) == "408"
    assert builtin.clean_completion(episode[1:]) == ""


@pytest.mark.parametrize(("completion", "reference", "expected"), [
    (r"so \boxed{\dfrac{1}{2}}.", r"$\frac{1}{2}$", 1.0),    # the last box, LaTeX normalised
    (r"\boxed{0.5}", r"$\frac{1}{2}$", 1.0),                  # a fraction by value
    (r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
    (r"first \boxed{3}, then \boxed{4}", "4", 1.0),           # the last box counts
    (r"\boxed{\{1, 2\}}", r"$\{1,2\}$", 1.0),                 # nested braces kept whole
    ("She sold 1,000 in all.", "Natalia sold 48/2 = 24 clips... #### 1000", 1.0),  # GSM8K
    (r"\boxed{Yes}", "yes", 1.0),
    ("The answer is 71.", "#### 72", 0.0),
    ("no number at all", "3", 0.0),
    (r"\boxed{1+x}", "$x+1$", 0.0),                           # text match, not symbolic
    ([{"role": "assistant", "content": r"\boxed{7}<|im_end|>"}], "7", 1.0),  # chat format
])
def test_math_answer(completion, reference, expected):
    assert builtin.math_answer([""], [completion], [reference]) == [expected]


def test_math_answer_through_a_spec_with_missing_references():
    reward = load_reward("reward_models.builtin:math_answer")
    assert reward(["p", "q"], [r"\boxed{2}", "2"], answer=["2", None]) == [1.0, None]

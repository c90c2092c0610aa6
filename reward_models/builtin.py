"""Built-in rule rewards, addressed as ``reward_models.builtin:<name>`` in a config.

They follow the Reward protocol. Most suit the embedded arithmetic task (prompts ``Q: 23+58=``,
completions `` 81``, integer answers 0..198 in the column ``answer``); ``math_answer`` judges
the final answer of a worked solution against a math dataset's reference answer. A completion
is cleaned before it is judged: text from the first end-of-sequence marker on (``</s>``,
``<|endoftext|>``, ...) is dropped, then surrounding whitespace. Chat-format completions (a
list of messages, as TRL passes in conversational mode) are judged by the content of the last
assistant message: in a tool-using episode, the model's final answer, never a tool's output.

Parameters are set per config entry with ``kwargs``::

    - {spec: reward_models.builtin:format_reward, kwargs: {max_digits: 3}}
    - {spec: reward_models.builtin:length_penalty, kwargs: {target_chars: 4, per_char: 0.05}}
    - {spec: reward_models.builtin:overlong_penalty, kwargs: {max_length: 6, soft_buffer: 2}}
    - {spec: reward_models.builtin:code_tests, kwargs: {all_or_nothing: true}}
"""

from __future__ import annotations

import re
from typing import Any

EOS_MARKERS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<eos>", "<pad>")
"""End-of-sequence texts that tokenizers leave in decoded completions."""

DEFAULT_MAX_DIGITS = 3  # format_reward: the embedded task's answers have at most 3 digits (198)
DEFAULT_TARGET_CHARS = 4  # length_penalty: free length of a cleaned completion, in characters
DEFAULT_PER_CHAR = 0.1  # length_penalty: reward lost per character beyond the free length
DEFAULT_MAX_LENGTH = 6  # overlong_penalty: the embedded configs' generation budget, in tokens
DEFAULT_SOFT_BUFFER = 2  # overlong_penalty: tokens before max_length where the penalty ramps


def clean_completion(completion: Any) -> str:
    """The text a rule judges: EOS marker and everything after it removed, then stripped.

    Args:
        completion: A string, or a list of chat messages (the ``content`` of the last one
            whose role is ``assistant`` is used, or of the last one when none has a role;
            none at all when only other roles spoke).

    Returns:
        The cleaned text.
    """
    if isinstance(completion, list):
        spoken = [m for m in completion if m.get("role", "assistant") == "assistant"]
        completion = (spoken[-1].get("content") or "") if spoken else ""
    elif isinstance(completion, dict):
        completion = completion["content"]
    text = str(completion)
    cut = min((i for i in (text.find(m) for m in EOS_MARKERS) if i >= 0), default=len(text))
    return text[:cut].strip()


def exact_match(
    prompts: list[str], completions: list[Any], answer: list[Any], **columns: Any
) -> list[float | None]:
    """1.0 where the cleaned completion equals ``str(answer).strip()``, else 0.0.

    Args:
        prompts: Unused (part of the protocol).
        completions: Generated completions, e.g. `` 81</s>``.
        answer: The reference per sample; None marks a sample without one (returns None).
        **columns: Other columns, ignored.

    Returns:
        One value per sample.
    """
    return [
        None if ref is None else float(clean_completion(c) == str(ref).strip())
        for c, ref in zip(completions, answer)
    ]


def format_reward(
    prompts: list[str],
    completions: list[Any],
    max_digits: int = DEFAULT_MAX_DIGITS,
    **columns: Any,
) -> list[float]:
    """1.0 where the cleaned completion is a plain integer of at most ``max_digits`` digits.

    A leading minus sign is allowed; spaces, signs elsewhere, decimals and words are not.

    Args:
        prompts: Unused (part of the protocol).
        completions: Generated completions.
        max_digits: Most digits allowed (3 for answers up to 198).
        **columns: Other columns, ignored.

    Returns:
        1.0 or 0.0 per sample.
    """
    pattern = re.compile(rf"-?\d{{1,{int(max_digits)}}}")
    return [float(pattern.fullmatch(clean_completion(c)) is not None) for c in completions]


def length_penalty(
    prompts: list[str],
    completions: list[Any],
    target_chars: int = DEFAULT_TARGET_CHARS,
    per_char: float = DEFAULT_PER_CHAR,
    **columns: Any,
) -> list[float]:
    """``-per_char * max(0, len(cleaned completion) - target_chars)``: 0 up to the target.

    Length is counted in characters of the cleaned completion, which needs no tokenizer (and
    equals tokens for the embedded task's character-level tokenizer).

    Args:
        prompts: Unused (part of the protocol).
        completions: Generated completions.
        target_chars: Length that costs nothing.
        per_char: Penalty per character beyond it.
        **columns: Other columns, ignored.

    Returns:
        A value <= 0 per sample.
    """
    excess = [max(0, len(clean_completion(c)) - target_chars) for c in completions]
    return [-per_char * n if n else 0.0 for n in excess]


def overlong_penalty(
    prompts: list[str],
    completions: list[Any],
    max_length: int = DEFAULT_MAX_LENGTH,
    soft_buffer: int = DEFAULT_SOFT_BUFFER,
    completion_ids: list[list[int]] | None = None,
    **columns: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), as TRL's
    ``get_soft_overlong_punishment``: 0 up to ``max_length - soft_buffer`` tokens, then
    ``(max_length - soft_buffer - length) / soft_buffer`` (down to -1 at ``max_length``), and
    -1 beyond. It only punishes: shorter answers gain nothing.

    Length is the number of generated tokens, EOS included, from ``completion_ids``, which
    ``align ppo`` passes to every reward (training and held-out scoring) as TRL's GRPOTrainer
    does. A caller without token ids gets the completion's length in characters instead.

    Args:
        prompts: Unused (part of the protocol).
        completions: Generated completions.
        max_length: L_max, usually the generation budget (``rollout.max_new_tokens``).
        soft_buffer: L_cache, the tokens before ``max_length`` over which the penalty ramps.
        completion_ids: Token ids of each completion, when the trainer passes them.
        **columns: Other columns, ignored.

    Returns:
        A value in [-1, 0] per sample.
    """
    if not 0 <= soft_buffer <= max_length:
        raise ValueError(f"overlong_penalty needs 0 <= soft_buffer <= max_length; got "
                         f"soft_buffer={soft_buffer}, max_length={max_length}")
    if completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(c if isinstance(c, str) else clean_completion(c)) for c in completions]
    free = max_length - soft_buffer
    return [0.0 if n <= free else (free - n) / soft_buffer if n <= max_length else -1.0
            for n in lengths]


def math_answer(
    prompts: list[str], completions: list[Any], answer: list[Any], **columns: Any
) -> list[float | None]:
    """1.0 where a completion's final answer equals the reference answer, else 0.0.

    The final answer is the content of the completion's last ``\\boxed{...}``, else its last
    number. The reference is a bare answer (``42``, ``$\\frac{1}{2}$``, ``Yes``) or a GSM8K
    solution ending in ``#### 42``. Both are normalised (``$`` delimiters, spaces,
    ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, thousands separators, a final period,
    case), and compare equal as text or, where both are numbers or integer fractions, by value.
    A light string match, not a symbolic checker: ``x+1`` and ``1+x`` differ (plug a checker
    such as math-verify in as a function of your own where that matters).

    Args:
        prompts: Unused (part of the protocol).
        completions: Generated solutions (strings, or chat messages).
        answer: The reference per sample (map a differently named column with
            ``data.columns``, e.g. ``{answer: solution}``); None gives None.
        **columns: Other columns, ignored.

    Returns:
        One value per sample.
    """
    results: list[float | None] = []
    for completion, ref in zip(completions, answer):
        if ref is None:
            results.append(None)
            continue
        reference = str(ref).rpartition("####")[2]
        given = final_answer(clean_completion(completion))
        results.append(float(given is not None and same_answer(given, reference)))
    return results


def code_tests(
    prompts: list[str], completions: list[Any], tests: list[Any], all_or_nothing: bool = False,
    **columns: Any
) -> list[float | None]:
    """The fraction of a row's tests that the completion's code passes, run in the sandbox.

    The code is the completion's last fenced block (or, with no opening fence, the text up
    to the first closing one, else all of it). ``tests`` holds assert statements (a list of
    strings, or one string of Python), stdin/stdout cases (``{"inputs": [...], "outputs":
    [...]}``, as a mapping or a JSON string, or a list of ``{"input", "output"}``), or call
    cases (that mapping with ``fn_name``); ``align.sandbox.code_tests`` says how each is judged.
    Every execution of the batch runs in the process's sandbox (``sandbox`` in the config,
    docs/sandbox.md), ``sandbox.max_concurrent`` at once; its counts are logged as
    ``sandbox/*``. A failure of the sandbox itself (not of the code) stops the run rather than
    score the batch unfairly.

    Args:
        prompts: Unused (part of the protocol).
        completions: Generated completions (strings, or chat messages).
        tests: Each row's tests (map a differently named column with ``data.columns``, e.g.
            ``{tests: test_list}``); None or empty gives None.
        all_or_nothing: 1.0 only when every test passes, else 0.0.
        **columns: Other columns, ignored.

    Returns:
        One value in [0, 1] (or None) per sample.
    """
    from align.sandbox import default_sandbox
    from align.sandbox.code_tests import extract_code, score_rows

    codes = [extract_code(clean_completion(c)) for c in completions]
    return score_rows(default_sandbox(), codes, list(tests), all_or_nothing)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}|(-?\d+)/(\d+)")


def final_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), else the last number."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, begin = 0, start + len("\\boxed{")
        for index in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth < 0:
                return text[begin:index]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same_answer(given: str, reference: str) -> bool:
    """Whether two answers agree once normalised: as text, or by value for numbers."""
    a, b = _normalise(given), _normalise(reference)
    if a == b:
        return True
    x, y = _value(a), _value(b)
    return x is not None and y is not None and abs(x - y) <= 1e-9 * max(1.0, abs(y))


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("\\!", ""), (" ", "")):
        text = text.replace(old, new)
    text = text.rstrip(".")
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
    return text.lower()


def _value(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    match = _FRACTION.fullmatch(text)
    if match is None:
        return None
    sign, top, bottom = ((match[1], match[2], match[3]) if match[2] is not None
                         else ("", match[4], match[5]))
    if int(bottom) == 0:
        return None
    return (-1 if sign else 1) * int(top) / int(bottom)


"""Adapters that let functions written for TRL, veRL or OpenRLHF serve as Rewards unchanged.

``adapt`` takes the user's function (with the spec's ``kwargs`` to bind), checks its
signature against the style with ``inspect.signature`` (a mismatch is a ConfigError at load
time, not a crash mid-run), and returns a callable with the Reward protocol signature
``(prompts, completions, **columns)`` that accepts every column.

- ``trl``: called as TRL calls it, by keyword. A function without ``**kwargs`` receives only the
  columns it names; a named column missing from the batch is a RewardError naming it. A spec
  ``kwargs`` key must name a parameter (``**kwargs`` is where columns go, so a typo would
  otherwise pass silently). Samples whose prompt was a message list (the batch's
  ``prompt_messages`` column) arrive as TRL's GRPOTrainer passes conversational data: the
  prompt as its messages and the completion as ``[{"role": "assistant", "content": text}]``;
  string prompts keep string completions. The column itself is not passed on.
- ``verl``: ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` once per
  sample, as veRL's reward manager calls it. ``solution_str`` is the completion; the others
  come from the columns ``data_source``, ``ground_truth`` (else ``answer``) and ``extra_info``,
  None where the batch lacks the column. A function without an ``extra_info`` parameter is
  called without it (veRL itself would fail). A dict result's ``"score"`` is the reward (its
  other keys are dropped). ``async def`` is awaited, all samples concurrently.
- ``openrlhf``: ``reward_func(queries, prompts, labels)`` once per batch, where ``queries`` are
  prompt + completion strings and ``labels`` come from the column ``label`` (else ``answer``,
  else ``ground_truth``; None each where none exists). A tensor, a list, or a dict with
  ``"rewards"`` is accepted.

For ``verl`` and ``openrlhf``, spec ``kwargs`` may also go to a ``**kwargs`` parameter, as veRL's
``reward_kwargs`` do.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from align.errors import ConfigError, RewardError, did_you_mean
from align.reward_columns import COMPLETION_MESSAGES_COLUMN, PROMPT_MESSAGES_COLUMN
from reward_models.protocol import describe_sample, is_async_callable

_VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
_VAR = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_POSITIONAL_ONLY = inspect.Parameter.POSITIONAL_ONLY


def adapt(
    fn: Callable[..., Any], style: str | None, kwargs: dict[str, Any], label: str
) -> Callable[..., Any]:
    """Wrap ``fn`` (written in ``style``) as a Reward, binding ``kwargs``.

    Args:
        fn: The user's function.
        style: ``None``/``"trl"``, ``"verl"`` or ``"openrlhf"``.
        kwargs: Keyword arguments to bind, like ``functools.partial``.
        label: The spec as written, for messages.

    Returns:
        A callable ``(prompts, completions, **columns)``; it returns an awaitable when ``fn``
        is async.

    Raises:
        ConfigError: When the signature does not fit the style or a kwarg is not accepted.
    """
    signature = _signature(fn)
    if signature is not None:
        # In TRL style **kwargs is where dataset columns arrive, so a config kwarg must name a
        # parameter (a typo fails here). veRL passes its reward_kwargs through **kwargs.
        _check_kwargs(signature, kwargs, label, into_var_keyword=style in ("verl", "openrlhf"))
    bound = functools.partial(fn, **kwargs) if kwargs else fn
    if style == "verl":
        return _adapt_verl(bound, signature, set(kwargs), label)
    if style == "openrlhf":
        return _adapt_openrlhf(bound, signature, set(kwargs), label)
    return _adapt_trl(bound, signature, set(kwargs), label)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none; skip the checks
        return None


def _check_kwargs(
    signature: inspect.Signature, kwargs: dict[str, Any], label: str, into_var_keyword: bool
) -> None:
    params = signature.parameters
    if into_var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    for key in kwargs:
        if key not in names:
            hint = did_you_mean(key, names, otherwise=f"; it accepts {names}")
            raise ConfigError(f"reward {label!r}: kwargs key {key!r} is not a parameter{hint}")


def conversational_form(prompts: Sequence[Any], completions: Sequence[Any],
                        messages: Sequence[list[dict] | None] | None,
                        turns: Sequence[list[dict]] | None = None) -> tuple[list, list]:
    """TRL's form of a batch: where ``messages[i]`` is a prompt's message list, that list and
    ``[{"role": "assistant", "content": completions[i]}]`` (for a multi-turn episode, its
    messages after the prompt, ``turns[i]``); other samples as they are."""
    if messages is None:
        return list(prompts), list(completions)
    turns = turns if turns is not None else [None] * len(completions)
    pairs = [(p, c) if m is None else (m, t if t is not None
                                       else [{"role": "assistant", "content": c}])
             for p, c, m, t in zip(prompts, completions, messages, turns)]
    return [p for p, _ in pairs], [c for _, c in pairs]


def _adapt_trl(
    fn: Callable[..., Any], signature: inspect.Signature | None, bound: set[str], label: str
) -> Callable[..., Any]:
    if signature is None:
        def call_unchecked(prompts: list[str], completions: list[str], **columns: Any) -> Any:
            messages = columns.pop(PROMPT_MESSAGES_COLUMN, None)
            turns = columns.pop(COMPLETION_MESSAGES_COLUMN, None)
            prompts, completions = conversational_form(prompts, completions, messages, turns)
            return fn(prompts=prompts, completions=completions, **columns)

        return call_unchecked
    params = {n: p for n, p in signature.parameters.items() if n not in bound}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keyword_names = {n for n, p in params.items() if p.kind not in (*_VAR, _POSITIONAL_ONLY)}
    if "completions" not in keyword_names and not takes_all:
        raise ConfigError(
            f"reward {label!r}: a reward function must accept fn(prompts, completions, "
            f"**columns) by keyword (TRL's signature); this one takes {signature}"
        )
    required = {
        n
        for n in keyword_names - {"prompts", "completions"}
        if params[n].default is inspect.Parameter.empty
    }

    def call_trl(prompts: list[str], completions: list[str], **columns: Any) -> Any:
        messages = columns.pop(PROMPT_MESSAGES_COLUMN, None)
        turns = columns.pop(COMPLETION_MESSAGES_COLUMN, None)
        prompts, completions = conversational_form(prompts, completions, messages, turns)
        missing = sorted(required - set(columns))
        if missing:
            raise RewardError(
                f"it needs column(s) {missing} but the batch has {sorted(columns) or 'none'}"
            )
        given = {"prompts": prompts, "completions": completions, **columns}
        if takes_all:  # exactly as TRL passes them (a column never overrides a bound kwarg)
            return fn(**{k: v for k, v in given.items() if k not in bound})
        return fn(**{k: v for k, v in given.items() if k in keyword_names})

    return call_trl


def _adapt_verl(
    fn: Callable[..., Any], signature: inspect.Signature | None, bound: set[str], label: str
) -> Callable[..., Any]:
    send = _verl_arguments(signature, bound, label)

    def sample_kwargs(i: int, completions: list[str], columns: dict[str, Any]) -> dict[str, Any]:
        values = {
            "data_source": _column_value(columns, ("data_source",), i),
            "solution_str": completions[i],
            "ground_truth": _column_value(columns, ("ground_truth", "answer"), i),
            "extra_info": _column_value(columns, ("extra_info",), i),
        }
        return {name: values[name] for name in send}

    def score_of(result: Any, i: int, prompts: Sequence[str]) -> Any:
        if isinstance(result, dict):
            if "score" not in result:
                raise RewardError(
                    f"it returned a dict without 'score' (keys {sorted(result)}) for "
                    f"{describe_sample(i, prompts)}"
                )
            return result["score"]
        return result

    def call_verl(prompts: list[str], completions: list[str], **columns: Any) -> Any:
        # One call per sample; an async function's calls are awaited together below.
        results = [_guarded(fn, sample_kwargs(i, completions, columns), i, prompts)
                   for i in range(len(completions))]
        if is_async_callable(fn):
            return _gather(results, prompts, score_of)
        return [score_of(result, i, prompts) for i, result in enumerate(results)]

    return call_verl


def _guarded(fn: Callable[..., Any], kwargs: dict[str, Any], index: int,
             prompts: Sequence[str]) -> Any:
    """`fn(**kwargs)` for sample `index`, its failure naming the sample."""
    try:
        return fn(**kwargs)
    except Exception as err:
        raise _sample_error(err, index, prompts) from err


async def _gather(pending: list[Awaitable[Any]], prompts: Sequence[str],
                  post: Callable[[Any, int, Sequence[str]], Any]) -> list[Any]:
    """Await one awaitable per sample concurrently; `post` each result, failures naming the
    sample."""
    async def one(index: int, awaitable: Awaitable[Any]) -> Any:
        try:
            result = await awaitable
        except Exception as err:
            raise _sample_error(err, index, prompts) from err
        return post(result, index, prompts)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(pending))))


def _verl_arguments(signature: inspect.Signature | None, bound: set[str], label: str) -> list[str]:
    """The veRL arguments to pass per sample: all four, less any the spec binds (a bound kwarg is
    not replaced) and less ``extra_info`` for a function without it (veRL itself would fail)."""
    send = [a for a in _VERL_ARGS if a not in bound]
    if signature is None:
        return send
    try:
        signature.bind(**dict.fromkeys(send), **dict.fromkeys(bound))
        return send
    except TypeError as err:
        without = [a for a in send if a != "extra_info"]
        try:
            signature.bind(**dict.fromkeys(without), **dict.fromkeys(bound))
        except TypeError:
            raise ConfigError(
                f"reward {label!r}: a veRL-style reward must accept compute_score("
                f"data_source, solution_str, ground_truth, extra_info=None) by keyword; "
                f"this one takes {signature} ({err})"
            ) from err
        return without


def _adapt_openrlhf(
    fn: Callable[..., Any], signature: inspect.Signature | None, bound: set[str], label: str
) -> Callable[..., Any]:
    if signature is not None:
        try:
            signature.bind([], [], [], **dict.fromkeys(bound))
        except TypeError as err:
            raise ConfigError(
                f"reward {label!r}: an OpenRLHF-style reward must accept "
                f"reward_func(queries, prompts, labels); this one takes {signature} ({err})"
            ) from err

    def rewards_of(result: Any) -> Any:
        if isinstance(result, dict):
            if "rewards" not in result:
                raise RewardError(f"it returned a dict without 'rewards' (keys {sorted(result)})")
            return result["rewards"]
        return result

    def call_openrlhf(prompts: list[str], completions: list[str], **columns: Any) -> Any:
        result = fn(*openrlhf_arguments(prompts, completions, columns))
        if inspect.isawaitable(result):
            return _then(result, rewards_of)
        return rewards_of(result)

    return call_openrlhf


def openrlhf_arguments(prompts: Sequence[Any], completions: Sequence[Any],
                       columns: dict[str, Any]) -> tuple[list[str], list[Any], list[Any]]:
    """OpenRLHF's ``(queries, prompts, labels)`` for a batch: ``queries`` are prompt +
    completion strings, ``labels`` the column ``label`` (else ``answer``, else
    ``ground_truth``; None each where none exists)."""
    queries = [str(p) + str(c) for p, c in zip(prompts, completions)]
    labels = [_column_value(columns, ("label", "answer", "ground_truth"), i)
              for i in range(len(prompts))]
    return queries, list(prompts), labels


async def _then(awaitable: Awaitable[Any], post: Callable[[Any], Any]) -> Any:
    return post(await awaitable)


def _column_value(columns: dict[str, Any], names: tuple[str, ...], index: int) -> Any:
    """The first of ``names`` present in the batch, at ``index``; None if none is present."""
    for name in names:
        if name in columns:
            value = columns[name]
            return value[index] if isinstance(value, (list, tuple)) else value
    return None


def _sample_error(err: Exception, index: int, prompts: Sequence[str]) -> RewardError:
    return RewardError(f"failed on {describe_sample(index, prompts)}: {type(err).__name__}: {err}")

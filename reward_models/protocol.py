"""The Reward protocol: what a reward callable looks like, and how async ones are run.

A reward scores one batch of samples::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

This is the signature Hugging Face TRL's ``GRPOTrainer`` calls reward functions with, so
functions written for TRL plug in unchanged. ``prompts`` and ``completions`` arrive as keyword
arguments; every other dataset column arrives as a keyword list of the same length (a row's
``answer`` is ``columns["answer"][i]``). ``None`` for a sample means "this reward does not
apply to it". ``async def`` rewards are awaited; sync code drives them with ``run_coroutine``.

The PPO-family trainer adds one column of its own, ``completion_truncated`` (TRUNCATED_COLUMN):
True where a completion stopped at its token budget rather than at EOS. The decoded text does
not show the difference; a trained reward model scores such a completion without EOS.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

TRUNCATED_COLUMN = "completion_truncated"  # per sample: hit the token budget without EOS

RewardValues = list[float | None]
"""One value per sample; ``None`` marks a sample the reward does not apply to."""

T = TypeVar("T")


@runtime_checkable
class Reward(Protocol):
    """Anything callable as ``fn(prompts, completions, **columns)`` returning one value a sample.

    An implementation may be a plain function, a callable object, or an ``async def`` function
    (its call then returns an awaitable of the list).
    """

    def __call__(
        self, prompts: list[str], completions: list[str], **columns: Any
    ) -> RewardValues | Awaitable[RewardValues]:
        """Score a batch: one float (or None) per (prompt, completion) pair."""
        ...


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine (async functions, partials, async ``__call__``).

    Args:
        fn: Any callable.

    Returns:
        True for ``async def`` functions, ``functools.partial`` of them, and objects whose
        ``__call__`` is ``async def``.
    """
    if inspect.iscoroutinefunction(fn):
        return True
    return callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code.

    Works whether or not this thread already runs an event loop (a notebook, an async trainer):
    ``asyncio.run`` refuses to nest, so in that case the coroutine runs on a short-lived helper
    thread with its own loop, and this thread waits for it.

    Args:
        coro: The coroutine to run.

    Returns:
        Whatever the coroutine returns; its exception, if any, propagates unchanged.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as err:  # handed back to the caller's thread below
            outcome["error"] = err

    helper = threading.Thread(target=target, name="reward-async", daemon=True)
    helper.start()
    helper.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

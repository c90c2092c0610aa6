"""The Reward protocol: what a reward callable looks like, and how async ones are run.

A reward scores one batch of samples::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

This is the signature Hugging Face TRL's ``GRPOTrainer`` calls reward functions with, so
functions written for TRL plug in unchanged. ``prompts`` and ``completions`` arrive as keyword
arguments; every other dataset column arrives as a keyword list of the same length (a row's
``answer`` is ``columns["answer"][i]``). ``None`` for a sample means "this reward does not
apply to it". ``async def`` rewards are awaited; sync code drives them with ``run_coroutine``.
``call_with_timeout`` bounds how long a sync reward may run.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

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


class CallTimeout(Exception):
    """A call did not return within its time limit (see ``call_with_timeout``)."""


def call_with_timeout(fn: Callable[..., T], timeout_s: float | None, **kwargs: Any) -> T:
    """``fn(**kwargs)``, raising CallTimeout when it has not returned within ``timeout_s``.

    On the main thread (where trainers call rewards) ``fn`` runs right there, so rewards that
    use signals themselves (math_verify's SIGALRM timeouts need the main thread) keep working:
    at the deadline a watchdog thread sends SIGINT to the main thread, which interrupts Python
    code and blocking system calls alike, and the KeyboardInterrupt is turned into CallTimeout.
    Off the main thread, or when SIGINT has a handler of someone else's, ``fn`` runs on a
    helper thread that is abandoned at the deadline. Neither can stop C code that holds the
    GIL, nor a function that catches KeyboardInterrupt and carries on (an answer it gives
    after the deadline is discarded).

    Args:
        fn: The callable.
        timeout_s: Seconds allowed; None calls ``fn`` with no limit.
        kwargs: Its keyword arguments.
    """
    if timeout_s is None:
        return fn(**kwargs)
    main = threading.main_thread()
    if threading.current_thread() is main and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        return _on_main_thread(fn, timeout_s, kwargs, main.ident)
    return _on_helper_thread(fn, timeout_s, kwargs)


def _on_main_thread(fn: Callable[..., T], timeout_s: float, kwargs: dict[str, Any],
                    main_id: int | None) -> T:
    lock = threading.Lock()
    state = {"running": True, "expired": False}

    def expire() -> None:
        with lock:  # never interrupts once the call has returned
            if state["running"]:
                state["expired"] = True
                signal.pthread_kill(main_id, signal.SIGINT)

    def stop() -> None:
        with lock:
            state["running"] = False
        timer.cancel()

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        try:
            result = fn(**kwargs)
        finally:
            stop()
        if state["expired"]:  # fn swallowed the interrupt, or it is still on its way
            _absorb_interrupt()
    except BaseException as err:
        if not state["expired"]:
            raise  # fn's own error, or a real Ctrl-C
        if not isinstance(err, KeyboardInterrupt):  # fn turned the interrupt into another error
            _absorb_interrupt()
        raise CallTimeout(f"no answer within {timeout_s} s") from None
    finally:
        stop()
    if state["expired"]:
        raise CallTimeout(f"no answer within {timeout_s} s")
    return result


def _absorb_interrupt(seconds: float = 1.0) -> None:
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass


def _on_helper_thread(fn: Callable[..., T], timeout_s: float, kwargs: dict[str, Any]) -> T:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(**kwargs)
        except BaseException as err:  # handed back to the caller's thread below
            outcome["error"] = err

    helper = threading.Thread(target=target, name="reward-call", daemon=True)
    helper.start()
    helper.join(timeout_s)
    if helper.is_alive():
        raise CallTimeout(f"no answer within {timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]

"""Run tool calls concurrently, each bounded by a timeout, none able to stall the run.

A sync tool runs on a daemon thread of its own; an ``async`` tool runs on one daemon event
loop shared by the process (``background_loop``). Whoever waits for a call waits at most the
timeout: a sync call still running then is abandoned (its thread is never joined, and it no
longer counts against the cap), an async one is cancelled. So a hung tool costs its timeout,
never the run.

What comes back is told apart the way the rest of an episode needs it:

- the tool raised: ``error=True``, and ``text`` is ``Error: <Type>: <message>``, which goes
  back to the model as the tool's answer (the model's mistake, counted);
- the tool did not answer in time: ``infra=True`` (an infrastructure failure: the episode is
  dropped, not trained on).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from align.errors import InfrastructureError

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


@dataclass
class ToolResult:
    """The answer to one call.

    Attributes:
        text: What the model reads: the tool's result as text, or an error text.
        error: The tool raised (the model's mistake, e.g. bad arguments).
        infra: The tool did not answer within the timeout (an infrastructure failure).
        seconds: Wall time from the call's start to its answer (or to the timeout).
        error_text: For an error or a timeout, what happened, for logs.
    """

    text: str
    error: bool
    infra: bool
    seconds: float
    error_text: str = ""


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's daemon event loop for async tools and ``get_reward``, started on first use.

    Everything async an environment does runs on this one loop, so clients an environment
    opens in one call (an HTTP session) are usable in the next.
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="align-episodes-loop",
                             daemon=True).start()
            _LOOP = loop
        return _LOOP


def run_awaitable(value: Any) -> Any:
    """``value`` itself, or, for an awaitable, its result computed on ``background_loop``."""
    if not hasattr(value, "__await__"):
        return value

    async def wait() -> Any:
        return await value

    return asyncio.run_coroutine_threadsafe(wait(), background_loop()).result()


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads: str as is, else JSON, else str()."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


class ToolExecutor:
    """Runs batches of tool calls: all at once, at most ``max_concurrent`` running.

    One executor serves every episode of a run; ``run`` may be called from several threads,
    and the cap holds over all of them. Calls wait for a free slot in the order submitted;
    the timeout counts from the moment a call starts.

    Args:
        max_concurrent: Calls running at once (``environment.max_concurrent_tools``).
        timeout_s: Seconds one call may run (``environment.tool_timeout_s``).
    """

    def __init__(self, max_concurrent: int, timeout_s: float) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.max_concurrent, self.timeout_s = max_concurrent, timeout_s
        # Each pool thread supervises one call for at most timeout_s: the pool's size is the cap.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrent,
                                                           thread_name_prefix="align-tool")

    def run(self, calls: list[tuple[Callable, dict, bool]]) -> list[ToolResult]:
        """Run ``calls`` concurrently and return their results in the same order.

        Args:
            calls: ``(tool, arguments, is_async)`` per call; the tool is called as
                ``tool(**arguments)``.

        Returns:
            One ToolResult per call. Never raises for what a tool does.
        """
        futures = [self._pool.submit(self._supervise, fn, args, is_async)
                   for fn, args, is_async in calls]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Stop taking calls; supervisors finish within the timeout, hung tools stay abandoned."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _supervise(self, fn: Callable, args: dict, is_async: bool) -> ToolResult:
        start = time.perf_counter()
        try:
            future = _start_async(fn, args) if is_async else _start_thread(fn, args)
            done, _ = concurrent.futures.wait([future], timeout=self.timeout_s)
            if not done:
                future.cancel()  # an async call is cancelled; a thread cannot be: abandoned
                reason = f"no answer within tool_timeout_s={self.timeout_s:g} s"
                return ToolResult(f"Error: TimeoutError: {reason}", error=False, infra=True,
                                  seconds=time.perf_counter() - start, error_text=reason)
            value = future.result()
        except InfrastructureError as err:  # what runs the tool failed (a sandbox): not the model's
            text = f"Error: {type(err).__name__}: {err}"
            return ToolResult(text, error=False, infra=True,
                              seconds=time.perf_counter() - start, error_text=text)
        except BaseException as err:  # the tool's own exception: its text goes back to the model
            text = f"Error: {type(err).__name__}: {err}"
            return ToolResult(text, error=True, infra=False,
                              seconds=time.perf_counter() - start, error_text=text)
        return ToolResult(result_text(value), error=False, infra=False,
                          seconds=time.perf_counter() - start)


def _start_thread(fn: Callable, args: dict) -> concurrent.futures.Future:
    """``fn(**args)`` on a daemon thread of its own, whose end nobody waits for."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(fn(**args))
        except BaseException as err:  # handed to the supervisor, which reports it
            future.set_exception(err)

    future.set_running_or_notify_cancel()
    threading.Thread(target=target, name=f"align-tool-{getattr(fn, '__name__', 'call')}",
                     daemon=True).start()
    return future


def _start_async(fn: Callable, args: dict) -> concurrent.futures.Future:
    """``fn(**args)`` scheduled on the background loop (arguments are bound here, so a wrong
    argument raises at once)."""
    return asyncio.run_coroutine_threadsafe(fn(**args), background_loop())

"""The Reward protocol, the checks on what a reward receives and returns, and LoadedReward.

A reward scores one batch of samples::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

This is the signature Hugging Face TRL's ``GRPOTrainer`` calls reward functions with, so
functions written for TRL plug in unchanged. ``prompts`` and ``completions`` arrive as keyword
arguments; every other dataset column arrives as a keyword list of the same length (a row's
``answer`` is ``columns["answer"][i]``). ``None`` for a sample means "this reward does not
apply to it". ``async def`` rewards are awaited; sync code drives them with ``run_coroutine``.
``call_with_timeout`` bounds how long a sync reward may run.

The PPO-family trainer adds columns of its own (align.reward_columns): ``completion_ids``, the
generated token ids as TRL passes them; ``completion_truncated`` (TRUNCATED_COLUMN), True where a
completion stopped at its token budget rather than at EOS (the decoded text does not show it; a
trained reward model scores such a completion without EOS); and, for conversational prompts,
``prompt_messages``. ``prompts`` are the rendered prompt texts and ``completions`` the decoded
texts; the ``trl``-style adapter (reward_models.style_adapters) turns conversational samples
into TRL's form (the prompt's messages, ``[{"role": "assistant", "content": text}]``).

Every check names the reward (its spec as written in the config) and, for a bad value, the
0-based sample index in the batch with an excerpt of its prompt, so a person can find the row.
A ``LoadedReward`` is any reward wrapped with its spec, its name and these checks: any
exception from the user's code becomes a RewardError that names the spec and keeps the original
text, chained with ``from``; nothing is swallowed.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from align.errors import RewardError
from align.reward_columns import TRUNCATED_COLUMN as TRUNCATED_COLUMN  # re-exported

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


_EXCERPT_CHARS = 60
# Largest reward magnitude accepted, for each reward and for the weighted total: advantages are
# computed in float32 (max 3.4e38), where squares of larger values (a variance) overflow.
REWARD_LIMIT = 1e15


def describe_sample(index: int, prompts: Sequence[Any]) -> str:
    """Name a sample for an error message: ``sample 3 (prompt 'Q: 23+58=')``.

    Args:
        index: 0-based position of the sample in the batch.
        prompts: The batch's prompts (used for a short excerpt when available).

    Returns:
        A short human-readable description.
    """
    if 0 <= index < len(prompts):
        text = str(prompts[index])
        if len(text) > _EXCERPT_CHARS:
            text = text[:_EXCERPT_CHARS] + "..."
        return f"sample {index} (prompt {text!r})"
    return f"sample {index}"


def check_batch(
    label: str, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, Any]
) -> None:
    """Check that prompts, completions and list-valued columns describe the same samples.

    Args:
        label: The reward spec, for the message.
        prompts: One prompt per sample.
        completions: One completion per sample.
        columns: Other dataset columns; list or tuple values must have one entry per sample.
            Other values (a trainer's extras) are passed through unchecked.

    Raises:
        RewardError: When a length differs, naming the reward and the column.
    """
    for what, value in (("prompts", prompts), ("completions", completions)):
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise RewardError(
                f"reward {label!r}: {what} must be a list, got {type(value).__name__}"
            )
    n = len(prompts)
    if len(completions) != n:
        raise RewardError(f"reward {label!r}: got {n} prompts but {len(completions)} completions")
    for key, value in columns.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise RewardError(
                f"reward {label!r}: column {key!r} has {len(value)} values for {n} samples"
            )


def check_values(label: str, values: Any, prompts: Sequence[Any]) -> RewardValues:
    """Validate a reward's output for a batch and convert it to ``list[float | None]``.

    Lists and tuples are accepted, and so are 1-D arrays and tensors (anything with
    ``tolist()``). Each entry must be a real number (bools count as 0/1) or ``None``; a
    one-element tensor entry is unwrapped with ``item()``.

    Args:
        label: The reward spec, for the message.
        values: What the reward returned.
        prompts: The batch's prompts; their count is the expected length.

    Returns:
        The values as Python floats, ``None`` kept.

    Raises:
        RewardError: On a non-list, a wrong length, a non-number, NaN or infinity, or a
            magnitude over ``REWARD_LIMIT``, naming the reward and (for a value) the sample.
    """
    n = len(prompts)
    if not isinstance(values, (list, tuple)) and hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(
            f"reward {label!r} returned {type(values).__name__}, expected a list of {n} "
            "numbers (or None for samples it does not apply to)"
        )
    if len(values) != n:
        raise RewardError(f"reward {label!r} returned {len(values)} values for {n} samples")
    return [_check_value(label, value, index, prompts) for index, value in enumerate(values)]


def _check_value(label: str, value: Any, index: int, prompts: Sequence[Any]) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):
            pass  # a multi-element array: reported as a non-number just below
    if not isinstance(value, numbers.Real):
        shown = repr(value)
        if len(shown) > _EXCERPT_CHARS:
            shown = shown[:_EXCERPT_CHARS] + "..."
        raise RewardError(
            f"reward {label!r} returned {type(value).__name__} {shown} for "
            f"{describe_sample(index, prompts)}; expected a number or None"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise RewardError(
            f"reward {label!r} returned {_short(value)} for {describe_sample(index, prompts)}; "
            "rewards must be finite (return None if the reward does not apply)"
        )
    if abs(number) > REWARD_LIMIT:
        raise RewardError(
            f"reward {label!r} returned {number:g} for {describe_sample(index, prompts)}; "
            f"rewards must lie within +-{REWARD_LIMIT:g} (the trainer computes in float32)"
        )
    return number


def _short(value: Any) -> str:
    shown = str(value)
    return shown if len(shown) <= _EXCERPT_CHARS else shown[:_EXCERPT_CHARS] + "..."


class LoadedReward:
    """A reward function with the spec it came from and validation of what it returns.

    Args:
        fn: A callable with the Reward protocol signature (sync or async).
        label: The spec as the user wrote it; every message names it.
        name: Short name for metrics (``rewards/<name>/mean``).
        reload: A picklable zero-argument callable that loads this reward again (the loader
            passes ``functools.partial(load_reward, spec, base_dir)``), so a file-based reward
            pickles as its spec and is loaded again on the other side (e.g. in a Ray actor);
            None pickles ``fn`` itself.
        timeout_s: Seconds one call may take (an async reward included) before it fails
            with a RewardError; None: no limit (the loader passes the spec's ``timeout_s``).
    """

    def __init__(self, fn: Callable[..., Any], label: str, name: str,
                 reload: Callable[[], LoadedReward] | None = None,
                 timeout_s: float | None = None) -> None:
        self.fn = fn
        self.label = label
        self.name = name
        self.reload = reload
        self.timeout_s = timeout_s

    def close(self) -> None:
        """Release what the reward holds (a reward model's Ray actors): calls the wrapped
        callable's own ``close()`` when it has one. Safe to call twice."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"LoadedReward(name={self.name!r}, spec={self.label!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        if self.reload is None:
            return (LoadedReward, (self.fn, self.label, self.name, None, self.timeout_s))
        return (self.reload, ())

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> RewardValues:
        """Score a batch; an async reward is run to completion.

        Raises:
            RewardError: If the reward raises or returns something invalid; the message names
                the spec and, for a bad value, the sample.
        """
        result = self.start(prompts, completions, **columns)
        if inspect.isawaitable(result):
            return run_coroutine(result)
        return result

    def start(
        self, prompts: list[str], completions: list[str], **columns: Any
    ) -> RewardValues | Awaitable[RewardValues]:
        """Call the reward; return checked values, or a coroutine that yields them.

        This is the building block that lets CombinedReward run all async rewards
        concurrently: sync rewards finish here, async ones are awaited together later.
        """
        check_batch(self.label, prompts, completions, columns)
        try:
            result = call_with_timeout(self.fn, self.timeout_s, prompts=prompts,
                                       completions=completions, **columns)
        except CallTimeout:
            raise self._timed_out() from None
        except Exception as err:
            raise self._wrap(err) from err
        if inspect.isawaitable(result):
            return self._finish(result, prompts)
        return check_values(self.label, result, prompts)

    async def _finish(self, pending: Awaitable[Any], prompts: list[str]) -> RewardValues:
        try:
            result = await asyncio.wait_for(pending, self.timeout_s)
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        except Exception as err:
            raise self._wrap(err) from err
        return check_values(self.label, result, prompts)

    def _timed_out(self) -> RewardError:
        return RewardError(f"reward {self.label!r} did not return within timeout_s="
                           f"{self.timeout_s} s; the run stops rather than wait on it (raise "
                           "the reward's timeout_s if it is legitimately this slow)")

    def _wrap(self, err: Exception) -> RewardError:
        if isinstance(err, RewardError):  # our adapters' messages already say what happened
            return RewardError(f"reward {self.label!r}: {err}")
        return RewardError(f"reward {self.label!r} raised {type(err).__name__}: {err}")

"""LoadedReward: a reward callable wrapped with its spec, its name, and output checks.

Whatever kind of spec it came from, a LoadedReward is itself a Reward: calling it scores the
batch, awaits an async reward, and validates the result. Any exception from the user's code
becomes a RewardError that names the spec and keeps the original text, chained with ``from``;
nothing is swallowed. A reward loaded from a spec pickles as that spec and is loaded again on
the other side, so a file-based reward can be shipped to a Ray actor.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from align.errors import RewardError
from reward_models.protocol import CallTimeout, RewardValues, call_with_timeout, run_coroutine
from reward_models.spec import RewardSpec
from reward_models.validation import check_batch, check_values


class LoadedReward:
    """A reward function with the spec it came from and validation of what it returns.

    Args:
        fn: A callable with the Reward protocol signature (sync or async).
        label: The spec as the user wrote it; every message names it.
        name: Short name for metrics (``rewards/<name>/mean``).
        spec: The RewardSpec it was loaded from, if any (used for pickling).
        base_dir: Folder relative paths in ``spec`` resolved against.
        timeout_s: Seconds one call may take (an async reward included) before it fails
            with a RewardError; None: no limit. Default: the spec's ``timeout_s``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        label: str,
        name: str,
        spec: RewardSpec | None = None,
        base_dir: Path | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.fn = fn
        self.label = label
        self.name = name
        self.spec = spec
        self.base_dir = base_dir
        self.timeout_s = timeout_s if timeout_s is not None or spec is None else spec.timeout_s

    def close(self) -> None:
        """Release what the reward holds (a reward model's Ray actors): calls the wrapped
        callable's own ``close()`` when it has one. Safe to call twice."""
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"LoadedReward(name={self.name!r}, spec={self.label!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        if self.spec is None:
            return (LoadedReward, (self.fn, self.label, self.name, None, self.base_dir,
                                   self.timeout_s))
        from reward_models.loading import load_reward  # loading imports this module

        return (load_reward, (self.spec, self.base_dir))

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

    async def ascore(
        self, prompts: list[str], completions: list[str], **columns: Any
    ) -> RewardValues:
        """Score a batch from async code (an async reward is awaited, not run in a new loop)."""
        result = self.start(prompts, completions, **columns)
        if inspect.isawaitable(result):
            return await result
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

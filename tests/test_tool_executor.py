"""Tool calls run concurrently under a timeout and a cap: a hung tool costs its timeout and
nothing more, exceptions become the model's error text, timeouts are infrastructure failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from align.episodes.executor import ToolExecutor


class Gauge:
    """Counts calls running at once and remembers the most seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.now -= 1


def add(a: int, b: int) -> int:
    return a + b


def hang() -> str:
    time.sleep(30)
    return "never"


async def async_echo(text: str, delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    return text.upper()


@pytest.fixture()
def executor():
    ex = ToolExecutor(max_concurrent=8, timeout_s=0.5)
    yield ex
    ex.close()


def test_a_hanging_tool_costs_its_timeout_and_the_rest_of_the_batch_answers(executor):
    start = time.perf_counter()
    results = executor.run([(hang, {}, False), (add, {"a": 2, "b": 3}, False),
                            (async_echo, {"text": "hi", "delay": 0.05}, True)])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.2, elapsed
    hung, summed, echoed = results
    assert hung.infra and not hung.error and 0.5 <= hung.seconds < 1.0
    assert "tool_timeout_s=0.5" in hung.error_text
    assert (summed.text, summed.error, summed.infra) == ("5", False, False)
    assert (echoed.text, echoed.error, echoed.infra) == ("HI", False, False)


def test_an_abandoned_call_frees_its_slot():
    executor = ToolExecutor(max_concurrent=1, timeout_s=0.3)
    start = time.perf_counter()
    first, second = executor.run([(hang, {}, False), (add, {"a": 1, "b": 1}, False)])
    executor.close()
    assert first.infra and second.text == "2"
    assert time.perf_counter() - start < 2.0  # not the 30 s the hung call sleeps


@pytest.mark.parametrize("is_async", [False, True])
def test_at_most_max_concurrent_calls_run_at_once(is_async):
    gauge = Gauge()

    def slow_sync() -> str:
        with gauge:
            time.sleep(0.1)
        return "ok"

    async def slow_async() -> str:
        with gauge:
            await asyncio.sleep(0.1)
        return "ok"

    executor = ToolExecutor(max_concurrent=3, timeout_s=5)
    fn = slow_async if is_async else slow_sync
    results = executor.run([(fn, {}, is_async)] * 9)
    executor.close()
    assert [r.text for r in results] == ["ok"] * 9
    assert gauge.most == 3, gauge.most


def test_the_cap_holds_across_threads_calling_run():
    gauge = Gauge()

    def slow() -> str:
        with gauge:
            time.sleep(0.05)
        return "ok"

    executor = ToolExecutor(max_concurrent=2, timeout_s=5)
    threads = [threading.Thread(target=executor.run, args=([(slow, {}, False)] * 4,))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    executor.close()
    assert gauge.most == 2


def test_async_tools_share_one_loop_and_overlap(executor):
    start = time.perf_counter()
    results = executor.run([(async_echo, {"text": w, "delay": 0.2}, True) for w in "abcd"])
    assert [r.text for r in results] == ["A", "B", "C", "D"]
    assert time.perf_counter() - start < 0.6  # one after another: 0.8 s
    assert all(0.2 <= r.seconds < 0.6 for r in results)


def test_a_hanging_async_tool_is_cancelled():
    cancelled = threading.Event()

    async def stuck() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    executor = ToolExecutor(max_concurrent=2, timeout_s=0.2)
    (result,) = executor.run([(stuck, {}, True)])
    executor.close()
    assert result.infra and not result.error
    assert cancelled.wait(1.0)


def test_exceptions_are_the_models_error_text(executor):
    def divide(a: int, b: int) -> float:
        return a / b

    async def refuse(city: str) -> str:
        raise ValueError(f"unknown city {city!r}")

    results = executor.run([(divide, {"a": 1, "b": 0}, False),
                            (refuse, {"city": "Atlantis"}, True),
                            (add, {"a": 1}, False),
                            (async_echo, {"txt": "x"}, True)])
    texts = [r.text for r in results]
    assert texts[0] == "Error: ZeroDivisionError: division by zero"
    assert texts[1] == "Error: ValueError: unknown city 'Atlantis'"
    assert texts[2].startswith("Error: TypeError: ") and "'b'" in texts[2]
    assert texts[3].startswith("Error: TypeError: ") and "'txt'" in texts[3]
    assert all(r.error and not r.infra and r.error_text == r.text for r in results)


def test_results_that_are_not_text_are_json_or_str(executor):
    class Opaque:
        def __str__(self) -> str:
            return "<opaque>"

    values = [{"a": [1, 2]}, 7, None, Opaque(), "plain"]
    results = executor.run([((lambda v=v: v), {}, False) for v in values])
    assert [r.text for r in results] == ['{"a": [1, 2]}', "7", "null", "<opaque>", "plain"]
    assert not any(r.error or r.infra for r in results)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_concurrent"):
        ToolExecutor(max_concurrent=0, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        ToolExecutor(max_concurrent=1, timeout_s=0)


def test_a_tool_whose_machinery_fails_is_an_infrastructure_failure():
    """A sandbox that cannot start (an InfrastructureError) is not the model's mistake."""
    from align.errors import InfrastructureError

    def broken_sandbox(code: str) -> str:
        raise InfrastructureError("the sandbox could not start")

    result = ToolExecutor(2, 5.0).run([(broken_sandbox, {"code": "1"}, False)])[0]
    assert result.infra and not result.error and "could not start" in result.error_text

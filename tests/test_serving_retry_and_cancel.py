"""LeaderWatchTask: retry delays come from RetryBackoff, and a cancellation that arrives
together with a leadership change wins over handling it (asyncio and trio)."""

from __future__ import annotations

import anyio
import pytest

from leaderwatch.serving import (
    BaseLeadershipHandler,
    LeadershipStreamClosed,
    LeaderWatchTask,
    NotServing,
    RetryBackoff,
    Serving,
    TransientLeadershipError,
)
from leaderwatch.state import Leader
from leaderwatch.testing import capture_events
from leaderwatch.watch import LeaderWatch

pytestmark = pytest.mark.anyio


def test_retry_backoff_makes_fresh_capped_exponential_series() -> None:
    settings = RetryBackoff(initial=0.01, maximum=0.05, multiplier=3.0)
    backoff = settings.backoff()
    assert [backoff.next_delay() for _ in range(4)] == pytest.approx([0.01, 0.03, 0.05, 0.05])
    assert settings.backoff().next_delay() == 0.01  # each series starts over
    backoff.reset()
    assert backoff.next_delay() == 0.01
    default = RetryBackoff().backoff()
    assert [default.next_delay() for _ in range(5)] == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25])


class FailsEachEpoch(BaseLeadershipHandler):
    """``on_leader(e)`` fails ``failures`` times for every epoch, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.left: dict[int, int] = {}

    async def on_leader(self, epoch: int) -> None:
        left = self.left.setdefault(epoch, self.failures)
        if left:
            self.left[epoch] = left - 1
            raise TransientLeadershipError("not yet")


async def test_retry_delays_grow_to_the_cap_and_start_over_for_each_call() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    settings = RetryBackoff(initial=0.001, maximum=0.004)
    task = LeaderWatchTask(watch.subscribe(), FailsEachEpoch(4), retry_backoff=settings)
    with capture_events() as logs, anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(task.run)
            await task.serving.wait_for(lambda gate: gate == Serving(epoch=5))
            watch.publish(Leader(epoch=6))
            await task.serving.wait_for(lambda gate: gate == Serving(epoch=6))
            tg.cancel_scope.cancel()
    delays = [e["delay_s"] for e in logs if e["event"] == "leadership_handler_retrying"]
    assert delays == [0.001, 0.002, 0.004, 0.004] * 2
    attempts = [e["attempt"] for e in logs if e["event"] == "leadership_handler_retrying"]
    assert attempts == [1, 2, 3, 4] * 2
    assert task.stats.retries == 8


class Counting(BaseLeadershipHandler):
    def __init__(self) -> None:
        self.leader_calls: list[int] = []

    async def on_leader(self, epoch: int) -> None:
        self.leader_calls.append(epoch)


@pytest.mark.parametrize("change", ["new value", "stream closed"])
async def test_a_cancellation_arriving_with_a_change_wins_over_handling_it(change: str) -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Counting()
    task = LeaderWatchTask(watch.subscribe(), handler)
    outcome: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                try:
                    await task.run()
                except LeadershipStreamClosed:
                    outcome.append("stream closed")
                except anyio.get_cancelled_exc_class():
                    outcome.append("cancelled")
                    raise

            tg.start_soon(run)
            await task.serving.wait_for(lambda gate: gate == Serving(epoch=5))
            await anyio.wait_all_tasks_blocked()
            if change == "new value":
                watch.publish(Leader(epoch=6))
            else:
                watch.close()
            tg.cancel_scope.cancel()
    assert outcome == ["cancelled"]
    assert handler.leader_calls == [5]
    assert task.serving.borrow() == NotServing()

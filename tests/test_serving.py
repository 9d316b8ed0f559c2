"""LeaderWatchTask: the serving gate, fencing, retries, failure and shutdown (DESIGN contract 8)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskGroup
from pydantic import TypeAdapter, ValidationError

from leaderwatch.channel import WatchSender
from leaderwatch.serving import (
    EVENT_NAMES,
    BaseLeadershipHandler,
    LeadershipHandler,
    LeadershipStreamClosed,
    LeaderWatchTask,
    NotServing,
    RetryBackoff,
    Serving,
    ServingState,
    TransientLeadershipError,
)
from leaderwatch.state import Follower, Leader, Unknown
from leaderwatch.testing import capture_events
from leaderwatch.watch import LeaderWatch

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
FAST = RetryBackoff(initial=0.001, maximum=0.002)
B = "node-b:9000"


class Recorder(BaseLeadershipHandler):
    """Records every call and the gate value at the moment of the call.

    ``hold`` makes ``on_leader(epoch)`` wait until ``release(epoch)`` (or until
    cancelled); ``shield`` makes that wait ignore cancellation.
    """

    def __init__(self) -> None:
        self.task: LeaderWatchTask | None = None
        self.calls: list[tuple[object, ...]] = []
        self.gate_at_call: list[Serving | NotServing] = []
        self.cancelled: list[int] = []
        self.hold: set[int] = set()
        self.shield = False
        self._releases: dict[int, anyio.Event] = {}
        self.started: dict[int, anyio.Event] = {}

    def started_event(self, epoch: int) -> anyio.Event:
        return self.started.setdefault(epoch, anyio.Event())

    def release(self, epoch: int) -> None:
        self._releases.setdefault(epoch, anyio.Event()).set()

    def _note(self, call: tuple[object, ...]) -> None:
        assert self.task is not None
        self.calls.append(call)
        self.gate_at_call.append(self.task.serving.borrow())

    async def on_leader(self, epoch: int) -> None:
        self._note(("leader", epoch))
        self.started_event(epoch).set()
        if epoch not in self.hold:
            return
        release = self._releases.setdefault(epoch, anyio.Event())
        try:
            # The deadline only keeps a failing test from hanging on a shielded wait.
            with anyio.CancelScope(shield=self.shield, deadline=anyio.current_time() + 10):
                await release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(epoch)
            raise

    async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
        self._note(("follower", leader_endpoint, leader_epoch))

    async def on_unknown(self) -> None:
        self._note(("unknown",))


def make_task(
    watch: LeaderWatch, handler: Recorder, **kwargs: object
) -> tuple[LeaderWatchTask, list[Serving | NotServing]]:
    """A task over ``watch``, with every gate value it stores recorded in order."""
    task = LeaderWatchTask(watch.subscribe(), handler, **kwargs)  # type: ignore[arg-type]
    handler.task = task
    history: list[Serving | NotServing] = []

    class RecordingGate(WatchSender[Serving | NotServing]):
        """Records every value stored, whichever send method stores it."""

        def send(self, value: Serving | NotServing) -> None:
            super().send(value)
            history.append(value)

        def send_replace(self, value: Serving | NotServing) -> Serving | NotServing:
            old = super().send_replace(value)
            history.append(value)
            return old

        def send_if_changed(self, value: Serving | NotServing) -> bool:
            changed = super().send_if_changed(value)
            if changed:
                history.append(value)
            return changed

    gate = RecordingGate(NotServing())
    task._gate = gate
    return task, history


async def gate_becomes(task: LeaderWatchTask, value: Serving | NotServing) -> None:
    with anyio.fail_after(5):
        await task.serving.wait_for(lambda current: current == value)


async def until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not predicate():
            await anyio.lowlevel.checkpoint()


@asynccontextmanager
async def running(task: LeaderWatchTask) -> AsyncIterator[TaskGroup]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(task.run)
        yield tg
        tg.cancel_scope.cancel()


# --- values ---------------------------------------------------------------------------------


async def test_serving_values_compare_by_payload_and_round_trip() -> None:
    adapter: TypeAdapter[Serving | NotServing] = TypeAdapter(ServingState)
    assert Serving(epoch=5) == Serving(epoch=5) != Serving(epoch=6)
    assert NotServing(leader_endpoint=B, leader_epoch=3) != NotServing(leader_endpoint=B)
    assert hash(NotServing()) == hash(NotServing())
    for value in (Serving(epoch=2**128 - 1), NotServing(), NotServing(leader_endpoint=B)):
        assert adapter.validate_json(value.model_dump_json()) == value
    with pytest.raises(ValidationError, match="scheme"):
        NotServing(leader_endpoint="http://node-b:9000")
    with pytest.raises(ValidationError):
        Serving(epoch=-1)


async def test_constructor_refuses_bad_arguments() -> None:
    watch = LeaderWatch("n")
    with pytest.raises(TypeError, match="WatchReceiver"):
        LeaderWatchTask(watch, Recorder())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseLeadershipHandler"):
        LeaderWatchTask(watch.subscribe(), object())  # type: ignore[arg-type]

    class SyncHandler:
        def on_leader(self, epoch: int) -> None: ...
        def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None: ...
        def on_unknown(self) -> None: ...

    with pytest.raises(TypeError, match="async on_leader"):
        LeaderWatchTask(watch.subscribe(), SyncHandler())  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="at least initial"):
        RetryBackoff(initial=1.0, maximum=0.5)
    with pytest.raises(ValidationError):
        RetryBackoff(initial=0)
    assert isinstance(BaseLeadershipHandler(), LeadershipHandler)


# --- the gate -------------------------------------------------------------------------------


async def test_gate_starts_not_serving_and_is_stored_without_subscribers() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Recorder()
    task, _ = make_task(watch, handler)
    assert task.serving.borrow() == NotServing()
    async with running(task):
        await until(lambda: task.stats.fences_completed == 1)
        assert task._gate.receiver_count == 0
        assert task.serving.borrow() == Serving(epoch=5)


async def test_leader_closes_gate_before_on_leader_and_serves_after() -> None:
    now = [100.0]

    class SlowFence(Recorder):
        async def on_leader(self, epoch: int) -> None:
            await super().on_leader(epoch)
            now[0] += 3.0

    watch = LeaderWatch("n", initial=Leader(epoch=4))
    handler = SlowFence()
    task, history = make_task(watch, handler, clock=lambda: now[0])
    async with running(task):
        await gate_becomes(task, Serving(epoch=4))
        watch.publish(Leader(epoch=5))
        await gate_becomes(task, Serving(epoch=5))
    assert handler.calls == [("leader", 4), ("leader", 5)]
    assert handler.gate_at_call == [NotServing(leader_epoch=4), NotServing(leader_epoch=5)]
    assert history == [
        NotServing(leader_epoch=4),
        Serving(epoch=4),
        NotServing(leader_epoch=5),
        Serving(epoch=5),
        NotServing(),
    ]
    stats = task.stats
    assert stats.fences_completed == 2
    assert stats.last_fence_latency == stats.max_fence_latency == 3.0


async def test_follower_and_unknown_set_the_gate_before_their_handler() -> None:
    watch = LeaderWatch("n", initial=Follower(leader_endpoint=B, leader_epoch=3))
    handler = Recorder()
    task, _ = make_task(watch, handler)
    async with running(task):
        await until(lambda: len(handler.calls) == 1)
        watch.publish(Unknown())
        await until(lambda: len(handler.calls) == 2)
        watch.publish(Follower(leader_endpoint=None, leader_epoch=4))
        await until(lambda: len(handler.calls) == 3)
        assert task.serving.borrow() == NotServing(leader_epoch=4)
    assert handler.calls == [("follower", B, 3), ("unknown",), ("follower", None, 4)]
    assert handler.gate_at_call == [
        NotServing(leader_endpoint=B, leader_epoch=3),
        NotServing(),
        NotServing(leader_epoch=4),
    ]
    assert task.stats.transitions_handled == 3


async def test_a_value_equal_to_the_handled_one_is_not_handled_again() -> None:
    sender: WatchSender[Leader | Follower | Unknown] = WatchSender(Leader(epoch=5))
    receiver = sender.subscribe()
    handler = Recorder()
    task = LeaderWatchTask(receiver, handler)
    handler.task = task
    async with running(task):
        await gate_becomes(task, Serving(epoch=5))
        sender.send(Leader(epoch=5))
        await anyio.wait_all_tasks_blocked()
        sender.send(Leader(epoch=6))
        await gate_becomes(task, Serving(epoch=6))
    assert handler.calls == [("leader", 5), ("leader", 6)]


# --- superseded fences ----------------------------------------------------------------------


async def test_newer_leader_cancels_the_fence_in_flight() -> None:
    watch = LeaderWatch("n")
    handler = Recorder()
    handler.hold = {5}
    task, history = make_task(watch, handler)
    async with running(task):
        watch.publish(Leader(epoch=5))
        with anyio.fail_after(5):
            await handler.started_event(5).wait()
        watch.publish(Leader(epoch=6))
        await gate_becomes(task, Serving(epoch=6))
    assert handler.cancelled == [5]
    assert handler.calls == [("leader", 5), ("leader", 6)]
    assert Serving(epoch=5) not in history
    assert task.stats.fences_superseded == 1
    assert task.stats.fences_completed == 1


@pytest.mark.parametrize("follower_handled", [True, False], ids=["follower-seen", "skipped"])
async def test_leader_follower_leader_during_slow_fence_ends_serving_newest(
    follower_handled: bool,
) -> None:
    watch = LeaderWatch("n")
    handler = Recorder()
    handler.hold = {5}
    task, history = make_task(watch, handler)
    async with running(task):
        watch.publish(Leader(epoch=5))
        with anyio.fail_after(5):
            await handler.started_event(5).wait()
        # Epoch 5 named this node: a step-down at 5 names no other leader (contract 4).
        watch.publish(Follower(leader_epoch=5))
        if follower_handled:
            await until(lambda: ("follower", None, 5) in handler.calls)
        watch.publish(Leader(epoch=6))
        await gate_becomes(task, Serving(epoch=6))
        assert task.serving.borrow() == Serving(epoch=6)
    assert handler.cancelled == [5]
    assert handler.calls[0] == ("leader", 5)
    assert handler.calls[-1] == ("leader", 6)
    assert (("follower", None, 5) in handler.calls) is follower_handled
    assert [value for value in history if isinstance(value, Serving)] == [Serving(epoch=6)]


async def test_fence_finishing_after_step_down_never_publishes_serving() -> None:
    watch = LeaderWatch("n")
    handler = Recorder()
    handler.hold = {5}
    handler.shield = True
    task, history = make_task(watch, handler)
    async with running(task):
        watch.publish(Leader(epoch=5))
        with anyio.fail_after(5):
            await handler.started_event(5).wait()
        watch.publish(Follower(leader_endpoint=B, leader_epoch=6))
        await gate_becomes(task, NotServing(leader_endpoint=B, leader_epoch=6))
        handler.release(5)
        await until(lambda: ("follower", B, 6) in handler.calls)
        await anyio.wait_all_tasks_blocked()
        assert task.serving.borrow() == NotServing(leader_endpoint=B, leader_epoch=6)
    assert not any(isinstance(value, Serving) for value in history)
    assert handler.cancelled == []
    assert task.stats.fences_superseded == 1
    assert task.stats.fences_completed == 0


async def test_fence_interrupted_by_a_step_down_is_rerun_even_at_the_same_epoch() -> None:
    watch = LeaderWatch("n")
    handler = Recorder()
    handler.hold = {5}
    handler.shield = True
    task, history = make_task(watch, handler)
    async with running(task):
        watch.publish(Leader(epoch=5))
        with anyio.fail_after(5):
            await handler.started_event(5).wait()
        # A step-down that names no other leader at epoch 5, so leading at 5 again is allowed.
        watch.publish(Follower(leader_epoch=5))
        await anyio.wait_all_tasks_blocked()
        assert task.serving.borrow() == NotServing(leader_epoch=5)
        watch.publish(Leader(epoch=5))
        handler.release(5)
        await until(lambda: task.stats.fences_completed == 1)
        assert task.serving.borrow() == Serving(epoch=5)
    assert handler.calls == [("leader", 5), ("leader", 5)]
    assert task.stats.fences_superseded == 1
    assert history.count(Serving(epoch=5)) == 1


async def test_fence_returning_after_leadership_moved_does_not_serve() -> None:
    """The leadership check happens when on_leader returns, not when it was called."""
    watch = LeaderWatch("n")

    class StepsDownWhileFencing(Recorder):
        async def on_leader(self, epoch: int) -> None:
            await super().on_leader(epoch)
            if epoch == 5:
                watch.publish(Unknown())

    handler = StepsDownWhileFencing()
    task, history = make_task(watch, handler)
    async with running(task):
        watch.publish(Leader(epoch=5))
        await until(lambda: ("unknown",) in handler.calls)
    assert not any(isinstance(value, Serving) for value in history)
    assert task.stats.fences_superseded == 1


# --- transient retries ----------------------------------------------------------------------


class Flaky(Recorder):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def on_leader(self, epoch: int) -> None:
        await super().on_leader(epoch)
        if self.failures:
            self.failures -= 1
            raise TransientLeadershipError("store not reachable yet")


async def test_transient_errors_are_retried_until_the_fence_succeeds() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Flaky(failures=3)
    task, _ = make_task(watch, handler, retry_backoff=FAST)
    async with running(task):
        await gate_becomes(task, Serving(epoch=5))
    assert handler.calls == [("leader", 5)] * 4
    assert handler.gate_at_call == [NotServing(leader_epoch=5)] * 4
    assert task.stats.retries == 3
    assert task.stats.failures == 0


async def test_new_value_ends_retrying_even_during_a_long_backoff() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Flaky(failures=10**9)
    slow = RetryBackoff(initial=3600.0, maximum=3600.0)
    task, _ = make_task(watch, handler, retry_backoff=slow)
    async with running(task):
        await until(lambda: task.stats.retries == 1)
        watch.publish(Follower(leader_endpoint=B, leader_epoch=6))
        await until(lambda: ("follower", B, 6) in handler.calls)
        assert task.serving.borrow() == NotServing(leader_endpoint=B, leader_epoch=6)
    assert handler.calls == [("leader", 5), ("follower", B, 6)]
    assert task.stats.retries == 1


async def test_transient_errors_raised_inside_a_handlers_task_group_are_retried() -> None:
    failures = [2]

    class GroupFence(Recorder):
        async def on_leader(self, epoch: int) -> None:
            await super().on_leader(epoch)
            if failures[0]:
                failures[0] -= 1

                async def fail() -> None:
                    raise TransientLeadershipError("store not ready")

                async with anyio.create_task_group() as tg:
                    tg.start_soon(fail)

    watch = LeaderWatch("n", initial=Leader(epoch=3))
    handler = GroupFence()
    task, _ = make_task(watch, handler, retry_backoff=FAST)
    async with running(task):
        await gate_becomes(task, Serving(epoch=3))
    assert task.stats.retries == 2
    assert task.stats.failures == 0


async def test_transient_errors_in_follower_handler_are_retried() -> None:
    class FlakyFollower(Recorder):
        failures = 2

        async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
            await super().on_follower(leader_endpoint, leader_epoch)
            if self.failures:
                self.failures -= 1
                raise TransientLeadershipError("later")

    watch = LeaderWatch("n", initial=Follower(leader_endpoint=B, leader_epoch=1))
    handler = FlakyFollower()
    task, _ = make_task(watch, handler, retry_backoff=FAST)
    async with running(task):
        await until(lambda: len(handler.calls) == 3)
    assert task.stats.retries == 2
    assert task.serving.borrow() == NotServing()


async def test_stuck_retries_warn_periodically() -> None:
    now = [0.0]

    class SlowFlaky(Flaky):
        async def on_leader(self, epoch: int) -> None:
            now[0] += 4.0
            await super().on_leader(epoch)

    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = SlowFlaky(failures=7)
    backoff = RetryBackoff(initial=0.001, maximum=0.001, stuck_warning_interval=10.0)
    task, _ = make_task(watch, handler, retry_backoff=backoff, clock=lambda: now[0])
    with capture_events() as logs:
        async with running(task):
            await gate_becomes(task, Serving(epoch=5))
    stuck = [entry for entry in logs if entry["event"] == "leadership_handler_retry_stuck"]
    # Failures at t=4, 8, ..., 28: 12 s and 20 s after the first one cross 10 s and 20 s.
    assert [(entry["attempts"], entry["elapsed_s"]) for entry in stuck] == [(4, 12.0), (6, 20.0)]
    assert all(entry["log_level"] == "warning" for entry in stuck)
    assert {entry["event"] for entry in logs} <= set(EVENT_NAMES)


# --- failure, stream close, cancellation ----------------------------------------------------


@pytest.mark.parametrize("failing", ["on_leader", "on_follower", "on_unknown"])
async def test_handler_exception_closes_gate_then_propagates(failing: str) -> None:
    class Broken(Recorder):
        async def on_leader(self, epoch: int) -> None:
            await super().on_leader(epoch)
            if failing == "on_leader" and epoch == 6:
                raise ValueError("high-water mark file is corrupt")

        async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
            if failing == "on_follower":
                raise ValueError("boom")

        async def on_unknown(self) -> None:
            if failing == "on_unknown":
                raise ValueError("boom")

    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Broken()
    task, history = make_task(watch, handler)
    gate_when_raised: list[Serving | NotServing] = []

    async def drive() -> None:
        await gate_becomes(task, Serving(epoch=5))
        transitions: dict[str, Leader | Follower | Unknown] = {
            "on_leader": Leader(epoch=6),
            "on_follower": Follower(leader_endpoint=B, leader_epoch=6),
            "on_unknown": Unknown(),
        }
        watch.publish(transitions[failing])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            try:
                await task.run()
            except ValueError:
                gate_when_raised.append(task.serving.borrow())
            else:
                pytest.fail("run() returned instead of raising the handler's error")
    assert gate_when_raised == [NotServing()]
    assert history[-1] == NotServing()
    assert task.stats.failures == 1


async def test_error_propagates_unwrapped_with_its_traceback() -> None:
    class Broken(BaseLeadershipHandler):
        async def on_unknown(self) -> None:
            raise KeyError("missing")

    watch = LeaderWatch("n")
    task = LeaderWatchTask(watch.subscribe(), Broken())
    with pytest.raises(KeyError, match="missing") as caught:
        await task.run()
    assert any(frame.name == "on_unknown" for frame in caught.traceback)


async def test_channel_close_closes_gate_and_raises_stream_closed() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Recorder()
    task, history = make_task(watch, handler)
    gate_when_raised: list[Serving | NotServing] = []

    async def drive() -> None:
        await gate_becomes(task, Serving(epoch=5))
        watch.close()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            try:
                await task.run()
            except LeadershipStreamClosed:
                gate_when_raised.append(task.serving.borrow())
            else:
                pytest.fail("run() returned instead of raising LeadershipStreamClosed")
    assert gate_when_raised == [NotServing()]
    assert history == [NotServing(leader_epoch=5), Serving(epoch=5), NotServing()]


async def test_current_gate_closes_the_moment_leadership_moves_on() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    task, _ = make_task(watch, Recorder())
    async with running(task):
        await gate_becomes(task, Serving(epoch=5))
        assert task.current_gate == Serving(epoch=5)
        watch.publish(Follower(leader_endpoint=B, leader_epoch=6))
        # The task has not run since: the stored gate is stale, the current one is not.
        assert task.serving.borrow() == Serving(epoch=5)
        assert task.current_gate == NotServing(leader_endpoint=B, leader_epoch=6)
        watch.publish(Leader(epoch=7))
        assert task.current_gate == NotServing(leader_epoch=7)
        await gate_becomes(task, Serving(epoch=7))
        assert task.current_gate == Serving(epoch=7)
        watch.close()
        assert task.current_gate == NotServing()


async def test_a_stream_closed_on_a_leader_value_never_opens_the_gate() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Recorder()
    task, history = make_task(watch, handler)
    watch.close()
    with pytest.raises(LeadershipStreamClosed), anyio.fail_after(5):
        await task.run()
    assert handler.calls == []
    assert Serving(epoch=5) not in history
    assert task.serving.borrow() == NotServing()


async def test_the_task_owns_its_receiver() -> None:
    watch = LeaderWatch("n")
    receiver = watch.subscribe()
    handler = Recorder()
    task = LeaderWatchTask(receiver, handler)
    handler.task = task
    async with running(task):
        await until(lambda: handler.calls == [("unknown",)])
        watch.publish(Leader(epoch=3))
        receiver.borrow_and_update()  # the caller consumes its own receiver
        await gate_becomes(task, Serving(epoch=3))
    assert handler.calls == [("unknown",), ("leader", 3)]


async def test_channel_close_during_a_fence_cancels_it() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Recorder()
    handler.hold = {5}
    task, history = make_task(watch, handler)

    async def drive() -> None:
        with anyio.fail_after(5):
            await handler.started_event(5).wait()
        watch.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(drive)
        with pytest.raises(LeadershipStreamClosed):
            await task.run()
    assert handler.cancelled == [5]
    assert task.serving.borrow() == NotServing()
    assert not any(isinstance(value, Serving) for value in history)


async def test_cancellation_while_serving_closes_gate_and_propagates() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Recorder()
    task, _ = make_task(watch, handler)
    after_run: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:

                async def stop() -> None:
                    await gate_becomes(task, Serving(epoch=5))
                    scope.cancel()

                tg.start_soon(stop)
                await task.run()
                after_run.append("run() returned")
    assert scope.cancelled_caught
    assert after_run == []
    assert task.serving.borrow() == NotServing()


async def test_cancellation_during_a_fence_cancels_it_and_closes_gate() -> None:
    watch = LeaderWatch("n", initial=Leader(epoch=5))
    handler = Recorder()
    handler.hold = {5}
    task, history = make_task(watch, handler)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(task.run)
            await handler.started_event(5).wait()
            tg.cancel_scope.cancel()
    assert handler.cancelled == [5]
    assert task.serving.borrow() == NotServing()
    assert not any(isinstance(value, Serving) for value in history)
    assert task.stats.fences_superseded == 0
    # The task can be run again once stopped, and starts from the current value.
    watch.publish(Leader(epoch=6))
    async with running(task):
        await gate_becomes(task, Serving(epoch=6))


async def test_run_refuses_to_run_twice_at_once() -> None:
    watch = LeaderWatch("n")
    task = LeaderWatchTask(watch.subscribe(), BaseLeadershipHandler())
    async with running(task):
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already running"):
            await task.run()


# --- the README example ---------------------------------------------------------------------


def test_serving_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serving.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert lines["start"].strip() == "NoLeaderYet(leader_epoch=None)"
    assert "Redirect(hint=LeaderHint(leader_endpoint='node-b:9000'" in lines["follower"]
    assert lines["leader"].strip() == "Serve(epoch=5)"
    assert lines["after shutdown"].strip() == "NoLeaderYet(leader_epoch=None)"
    assert lines["client follows"].strip() == "Follow(endpoint='node-b:9000', epoch=4)"
    assert lines["stale redirect"].strip().startswith("Stale(")
    assert "plaintext_downgrade" in lines["downgrade"]

"""StaticDriver and ManualDriver: the driver contract without an election."""

from __future__ import annotations

import sys

import anyio
import pytest
from anyio.abc import TaskGroup

import leaderwatch.drivers as drivers
from leaderwatch.channel import ChannelClosed, WatchReceiver
from leaderwatch.drivers import DriverBase, LeadershipDriver, ManualDriver, StaticDriver
from leaderwatch.state import Follower, InvalidEndpoint, InvalidEpoch, Leader, Unknown

State = Leader | Follower | Unknown


async def collect(receiver: WatchReceiver[State], into: list[State]) -> None:
    async for state in receiver:
        into.append(state)


async def first(receiver: WatchReceiver[State]) -> State:
    async for state in receiver:
        return state
    raise AssertionError("the channel yielded nothing")


@pytest.mark.anyio
async def test_static_leads_at_its_epoch_immediately_and_unknown_after_exit() -> None:
    driver = StaticDriver(epoch=7)
    assert isinstance(driver, LeadershipDriver)
    async with driver as entered:
        assert entered is driver
        with anyio.fail_after(1):
            assert await first(driver.leadership()) == Leader(epoch=7)
        receiver = driver.leadership()
    assert driver.current == Unknown()
    seen: list[State] = []
    with anyio.fail_after(1):
        await collect(receiver, seen)  # ends: the channel closed
    assert seen == [Unknown()]


@pytest.mark.anyio
async def test_static_exit_ends_an_iteration_in_progress() -> None:
    seen: list[State] = []
    with anyio.fail_after(2):
        async with anyio.create_task_group() as task_group, StaticDriver(epoch=3) as driver:
            task_group.start_soon(collect, driver.leadership(), seen)
            await anyio.wait_all_tasks_blocked()
            assert seen == [Leader(epoch=3)]
            # Leaving the task group requires collect() to have returned.
    assert seen == [Leader(epoch=3), Unknown()]


def test_static_refuses_bad_epochs() -> None:
    with pytest.raises(InvalidEpoch):
        StaticDriver(epoch=-1)
    with pytest.raises(InvalidEpoch):
        StaticDriver(epoch=2**128)


@pytest.mark.anyio
async def test_driver_is_entered_once() -> None:
    driver = StaticDriver()
    async with driver:
        pass
    with pytest.raises(RuntimeError, match="entered only once"):
        async with driver:
            pass


@pytest.mark.anyio
async def test_manual_first_value_is_unknown_then_every_transition_arrives() -> None:
    seen: list[State] = []
    async with ManualDriver() as driver, anyio.create_task_group() as task_group:
        task_group.start_soon(collect, driver.leadership(), seen)
        await anyio.wait_all_tasks_blocked()
        assert seen == [Unknown()]
        script: list[State] = [
            Follower(leader_endpoint="10.0.0.7:9000", leader_epoch=4),
            Follower(leader_endpoint="10.0.0.8:9000"),  # epoch 4 already named 10.0.0.7
            Follower(leader_endpoint="10.0.0.8:9000", leader_epoch=5),
            Leader(epoch=6),
            Leader(epoch=7),
            Unknown(),
        ]
        for state in script:
            match state:
                case Leader(epoch=epoch):
                    assert driver.become_leader(epoch)
                case Follower(leader_endpoint=endpoint, leader_epoch=epoch):
                    assert driver.become_follower(endpoint, epoch)
                case _:
                    assert driver.become_unknown()
            await anyio.wait_all_tasks_blocked()
        assert seen == [Unknown(), *script]
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_manual_suppresses_equal_values() -> None:
    async with ManualDriver() as driver:
        receiver = driver.leadership()
        assert driver.become_leader(5)
        assert receiver.has_changed()
        receiver.borrow_and_update()
        assert not driver.become_leader(5)
        assert not receiver.has_changed()
        assert driver.stats.suppressed == 1


@pytest.mark.anyio
async def test_manual_epoch_guard_turns_a_regression_into_unknown() -> None:
    async with ManualDriver() as driver:
        receiver = driver.leadership()
        driver.become_leader(5)
        assert not driver.become_leader(3)
        assert receiver.borrow_and_update() == Unknown()
        assert not driver.become_follower("10.0.0.1:1", 4)
        assert driver.current == Unknown()
        assert not driver.become_follower("10.0.0.1:1", 5)  # epoch 5 named this node
        assert driver.stats.conflicts == 1
        assert driver.become_follower("10.0.0.1:1", 6)
        assert driver.become_follower("10.0.0.1:1", None)
        assert driver.stats.regressions == 2


@pytest.mark.anyio
async def test_manual_refuses_bad_input_without_publishing() -> None:
    async with ManualDriver() as driver:
        with pytest.raises(InvalidEndpoint, match="scheme"):
            driver.become_follower("http://10.0.0.7:9000", 3)
        with pytest.raises(InvalidEpoch):
            driver.become_leader(-1)
        with pytest.raises(InvalidEpoch):
            driver.become_follower("10.0.0.7:9000", 2**128)
        assert driver.current == Unknown()
        assert driver.stats.delivered == 0


@pytest.mark.anyio
async def test_manual_exit_closes_the_channel_and_later_calls_fail() -> None:
    async with ManualDriver() as driver:
        driver.become_leader(2)
        receiver = driver.leadership()
    await receiver.changed()  # the resignation is still delivered...
    assert receiver.borrow() == Unknown()
    with pytest.raises(ChannelClosed):
        await receiver.changed()  # ...and then the channel is closed
    with pytest.raises(ChannelClosed):
        driver.become_leader(3)


class TaskDriver(DriverBase):
    """Leads at epoch 1 with two background tasks: one sleeps, one fails when told to.

    ``fail`` is ``"never"``, ``"on_trigger"`` (after :attr:`trigger` is set) or
    ``"on_cancel"`` (when cancelled, as a failing cleanup would).
    """

    def __init__(self, fail: str = "never") -> None:
        super().__init__("tasks")
        self.fail = fail
        self.trigger = anyio.Event()
        self.sleeper_ended = False

    async def _start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._sleeper)
        task_group.start_soon(self._failer)
        self._publish(Leader(epoch=1))

    async def _sleeper(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self.sleeper_ended = True

    async def _failer(self) -> None:
        if self.fail == "on_trigger":
            await self.trigger.wait()
            raise ValueError("background")
        try:
            await anyio.sleep_forever()
        finally:
            if self.fail == "on_cancel":
                raise ValueError("background")


async def assert_stopped(driver: TaskDriver) -> None:
    """Every task ended, ``Unknown()`` was published and the channel closed."""
    assert driver.sleeper_ended
    seen: list[State] = []
    with anyio.fail_after(1):
        await collect(driver.leadership(), seen)  # ends: the channel closed
    assert seen == [Unknown()]


@pytest.mark.anyio
async def test_outer_cancellation_passes_through_a_driver_with_tasks() -> None:
    driver = TaskDriver()
    reached: list[str] = []
    with anyio.fail_after(5), anyio.move_on_after(0.01) as scope:
        async with driver:
            await anyio.wait_all_tasks_blocked()
            assert driver.current == Leader(epoch=1)
            await anyio.sleep_forever()
        reached.append("after the driver")
    assert scope.cancelled_caught
    assert reached == []
    await assert_stopped(driver)


@pytest.mark.anyio
async def test_body_error_propagates_unwrapped_through_a_driver_with_tasks() -> None:
    driver = TaskDriver()

    async def run() -> None:
        async with driver:
            await anyio.wait_all_tasks_blocked()
            raise KeyError("body")

    with pytest.raises(KeyError, match="body") as caught:
        await run()
    assert type(caught.value) is KeyError
    await assert_stopped(driver)


@pytest.mark.anyio
async def test_background_failure_alone_cancels_the_body_and_is_raised_as_itself() -> None:
    driver = TaskDriver("on_trigger")
    body_cancelled = False

    async def run() -> None:
        nonlocal body_cancelled
        async with driver:
            driver.trigger.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                body_cancelled = True
                raise

    with anyio.fail_after(5), pytest.raises(ValueError, match="background") as caught:
        await run()
    assert type(caught.value) is ValueError
    assert body_cancelled
    await assert_stopped(driver)


@pytest.mark.parametrize("first", ["background", "body"])
@pytest.mark.anyio
async def test_background_failure_while_the_body_raises_keeps_both_errors(first: str) -> None:
    driver = TaskDriver("on_trigger" if first == "background" else "on_cancel")

    async def run() -> None:
        async with driver:
            await anyio.wait_all_tasks_blocked()
            if first == "body":
                raise KeyError("body")
            driver.trigger.set()
            try:
                await anyio.sleep_forever()
            finally:
                raise KeyError("body")  # the body's own cleanup fails while cancelled

    with anyio.fail_after(5), pytest.raises(ExceptionGroup) as caught:
        await run()
    assert [(type(e), str(e)) for e in caught.value.exceptions] == [
        (KeyError, "'body'"),
        (ValueError, "background"),
    ]
    await assert_stopped(driver)


def test_etcd_driver_without_its_dependencies_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(drivers.__dict__, "EtcdElectionDriver", raising=False)
    monkeypatch.setitem(sys.modules, "leaderwatch.drivers.etcd", None)
    with pytest.raises(ImportError, match=r"pip install 'leaderwatch\[etcd\]'"):
        _ = drivers.EtcdElectionDriver


def test_unknown_driver_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchDriver"):
        _ = drivers.NoSuchDriver


def test_etcd_driver_under_trio_gets_a_clear_error() -> None:
    from leaderwatch.drivers.etcd import EtcdElectionDriver, EtcdElectionError

    async def enter() -> None:
        async with EtcdElectionDriver("127.0.0.1:2379", election="e"):
            pass

    with pytest.raises(EtcdElectionError, match="asyncio backend"):
        anyio.run(enter, backend="trio")

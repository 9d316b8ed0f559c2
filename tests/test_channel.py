"""The latest-value watch channel (DESIGN contracts 6-7), on asyncio and trio."""

from __future__ import annotations

import gc

import anyio
import pytest

from leaderwatch.channel import ChannelClosed, WatchReceiver, WatchSender, watch_channel

pytestmark = pytest.mark.anyio


async def test_first_value_is_immediate_and_counts_as_seen() -> None:
    _tx, rx = watch_channel("a")
    assert rx.borrow() == "a"
    assert not rx.has_changed()
    received = []
    with anyio.fail_after(1):
        async for value in rx:
            received.append(value)
            break
    assert received == ["a"]


async def test_send_with_no_receivers_is_stored() -> None:
    tx: WatchSender[int] = WatchSender(0)
    assert tx.receiver_count == 0
    tx.send(1)
    tx.send(2)
    assert tx.borrow() == 2
    rx = tx.subscribe()
    assert rx.borrow() == 2
    assert not rx.has_changed()


async def test_changed_returns_for_newest_value_and_skips_intermediates() -> None:
    tx, rx = watch_channel(0)
    for value in range(1, 6):
        tx.send(value)
    assert rx.has_changed()
    with anyio.fail_after(1):
        await rx.changed()
    assert rx.borrow() == 5
    assert not rx.has_changed()


async def test_changed_waits_until_a_send() -> None:
    tx, rx = watch_channel(0)
    seen: list[int] = []

    async def waiter() -> None:
        await rx.changed()
        seen.append(rx.borrow())

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert seen == []
            tx.send(7)
    assert seen == [7]


async def test_send_always_notifies_even_an_equal_value() -> None:
    tx, rx = watch_channel(1)
    tx.send(1)
    assert rx.has_changed()


async def test_send_if_changed_only_notifies_for_a_different_value() -> None:
    tx, rx = watch_channel(1)
    assert tx.send_if_changed(1) is False
    assert not rx.has_changed()
    assert tx.send_if_changed(2) is True
    assert rx.has_changed()
    assert rx.borrow_and_update() == 2


async def test_send_replace_returns_old_value() -> None:
    tx, rx = watch_channel("old")
    assert tx.send_replace("new") == "old"
    assert rx.borrow_and_update() == "new"
    assert tx.send_replace("new") == "new"
    assert rx.has_changed()


async def test_send_modify_and_send_if_modified() -> None:
    tx, rx = watch_channel([1])
    tx.send_modify(lambda items: items.append(2))
    assert rx.has_changed()
    assert rx.borrow_and_update() == [1, 2]
    assert tx.send_if_modified(lambda items: False) is False
    assert not rx.has_changed()

    def grow(items: list[int]) -> bool:
        items.append(3)
        return True

    assert tx.send_if_modified(grow) is True
    assert rx.has_changed()
    assert rx.borrow() == [1, 2, 3]


async def test_borrow_does_not_mark_seen_but_borrow_and_update_does() -> None:
    tx, rx = watch_channel(0)
    tx.send(1)
    assert rx.borrow() == 1
    assert rx.has_changed()
    assert rx.borrow_and_update() == 1
    assert not rx.has_changed()


async def test_mark_changed_and_mark_unchanged() -> None:
    tx, rx = watch_channel(0)
    rx.mark_changed()
    assert rx.has_changed()
    with anyio.fail_after(1):
        await rx.changed()
    assert rx.borrow() == 0
    tx.send(1)
    rx.mark_unchanged()
    assert not rx.has_changed()


async def test_clone_inherits_the_seen_version() -> None:
    tx, rx = watch_channel(0)
    tx.send(1)
    unseen = rx.clone()
    assert unseen.has_changed()
    rx.borrow_and_update()
    seen = rx.clone()
    assert not seen.has_changed()
    assert unseen.has_changed()
    assert tx.receiver_count == 3


async def test_subscribe_counts_current_value_as_seen() -> None:
    tx, _rx = watch_channel(0)
    tx.send(1)
    late = tx.subscribe()
    assert not late.has_changed()
    assert late.borrow() == 1


async def test_changed_after_close_returns_for_unseen_final_value_then_raises() -> None:
    tx, rx = watch_channel(0)
    tx.send(1)
    tx.close()
    with anyio.fail_after(1):
        await rx.changed()
    assert rx.borrow() == 1
    with pytest.raises(ChannelClosed), anyio.fail_after(1):
        await rx.changed()


async def test_has_changed_raises_once_sender_closed() -> None:
    tx, rx = watch_channel(0)
    tx.close()
    with pytest.raises(ChannelClosed):
        rx.has_changed()


@pytest.mark.parametrize("closing", ["sender", "receiver"])
async def test_closing_either_end_wakes_a_waiter_with_channel_closed(closing: str) -> None:
    tx, rx = watch_channel(0)
    outcome: list[str] = []

    async def waiter() -> None:
        try:
            await rx.changed()
        except ChannelClosed:
            outcome.append("closed")

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            (tx if closing == "sender" else rx).close()
    assert outcome == ["closed"]


async def test_receiver_is_closed_once_sender_closes_yet_keeps_its_final_value() -> None:
    tx, rx = watch_channel(0)
    other = tx.subscribe()
    assert not rx.is_closed
    tx.send(1)
    assert not rx.is_closed
    tx.close()
    assert rx.is_closed
    assert other.is_closed
    assert rx.borrow() == 1
    with anyio.fail_after(1):
        await rx.changed()  # the unseen final value is still delivered
    assert rx.is_closed
    with pytest.raises(ChannelClosed), anyio.fail_after(1):
        await rx.changed()


async def test_receiver_is_closed_once_itself_closed_and_others_are_not() -> None:
    tx, rx = watch_channel(0)
    other = tx.subscribe()
    rx.close()
    assert rx.is_closed
    assert not other.is_closed
    assert not tx.is_closed
    tx.send(1)
    assert not other.is_closed
    assert rx.borrow() == 1


async def test_receiver_is_closed_once_the_sender_is_dropped() -> None:
    tx, rx = watch_channel(0)
    assert not rx.is_closed
    del tx
    gc.collect()
    assert rx.is_closed


async def test_a_waiter_sees_is_closed_when_woken_by_the_close() -> None:
    tx, rx = watch_channel(0)
    observed: list[bool] = []

    async def waiter() -> None:
        with pytest.raises(ChannelClosed):
            await rx.changed()
        observed.append(rx.is_closed)

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not rx.is_closed
            tx.close()
    assert observed == [True]


async def test_close_is_idempotent_and_send_after_close_raises() -> None:
    tx, _rx = watch_channel(0)
    assert not tx.is_closed
    tx.close()
    tx.close()
    assert tx.is_closed
    with pytest.raises(ChannelClosed):
        tx.send(1)
    with pytest.raises(ChannelClosed):
        tx.send_if_changed(1)
    assert tx.borrow() == 0


async def test_sender_context_manager_closes_on_exit() -> None:
    tx, rx = watch_channel(0)
    async with tx as sender:
        sender.send(1)
    assert tx.is_closed
    values = []
    with anyio.fail_after(1):
        async for value in rx:
            values.append(value)
    assert values == [1]


async def test_async_for_yields_current_then_newest_and_ends_on_close() -> None:
    tx, rx = watch_channel(0)
    values: list[int] = []

    async def consume() -> None:
        async for value in rx:
            values.append(value)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            assert values == [0]
            tx.send(1)
            await anyio.wait_all_tasks_blocked()
            tx.send(2)
            tx.send(3)
            await anyio.wait_all_tasks_blocked()
            tx.send(4)
            tx.close()
    assert values == [0, 1, 3, 4]


async def test_wait_for_checks_current_value_first() -> None:
    tx, rx = watch_channel(5)
    tx.send(6)
    with anyio.fail_after(1):
        assert await rx.wait_for(lambda v: v > 5) == 6
    assert not rx.has_changed()


async def test_wait_for_waits_for_a_matching_value() -> None:
    tx, rx = watch_channel(0)
    result: list[int] = []

    async def waiter() -> None:
        result.append(await rx.wait_for(lambda v: v % 2 == 1 and v > 2))

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            for value in (1, 2, 3, 4):
                await anyio.wait_all_tasks_blocked()
                tx.send(value)
    assert result == [3]


async def test_wait_for_after_close() -> None:
    tx, rx = watch_channel(0)
    tx.send(9)
    tx.close()
    with anyio.fail_after(1):
        assert await rx.wait_for(lambda v: v == 9) == 9
    with pytest.raises(ChannelClosed), anyio.fail_after(1):
        await rx.wait_for(lambda v: v == 10)


async def test_cancelled_waiter_loses_nothing() -> None:
    tx, rx = watch_channel(0)
    with anyio.move_on_after(0) as scope:
        await rx.changed()
    assert scope.cancelled_caught
    async with anyio.create_task_group() as tg:
        tg.start_soon(rx.changed)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    tx.send(1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(rx.changed)
        await anyio.wait_all_tasks_blocked()
        # A send raced with cancellation: the waiter is cancelled before it runs.
        tx.send(2)
        tg.cancel_scope.cancel()
    assert rx.has_changed()
    assert rx.borrow_and_update() == 2


async def test_receiver_count_tracks_close_and_garbage_collection() -> None:
    tx, rx = watch_channel(0)
    other = tx.subscribe()
    assert tx.receiver_count == 2
    rx.close()
    rx.close()
    assert tx.receiver_count == 1
    del other
    gc.collect()
    assert tx.receiver_count == 0


async def test_closed_receiver_refuses_waits() -> None:
    _tx, rx = watch_channel(0)
    rx.close()
    with pytest.raises(ChannelClosed):
        await rx.changed()
    with pytest.raises(ChannelClosed):
        rx.has_changed()
    assert rx.borrow() == 0


async def test_sender_closed_returns_when_no_receiver_remains() -> None:
    tx, rx = watch_channel(0)
    other = rx.clone()
    done: list[bool] = []

    async def wait_closed() -> None:
        await tx.closed()
        done.append(True)

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_closed)
            await anyio.wait_all_tasks_blocked()
            rx.close()
            await anyio.wait_all_tasks_blocked()
            assert done == []
            other.close()
    assert done == [True]
    with anyio.fail_after(1):
        await tx.closed()


async def test_many_waiting_receivers_all_see_the_newest() -> None:
    tx, first = watch_channel(0)
    receivers = [first] + [tx.subscribe() for _ in range(50)]
    seen: list[int] = []

    async def wait(rx: WatchReceiver[int]) -> None:
        await rx.changed()
        seen.append(rx.borrow())

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for rx in receivers:
                tg.start_soon(wait, rx)
            await anyio.wait_all_tasks_blocked()
            tx.send(1)
            tx.send(2)
    assert seen == [2] * len(receivers)


def test_channel_can_be_built_and_used_outside_an_event_loop() -> None:
    tx, rx = watch_channel(0)
    tx.send(1)
    assert rx.has_changed()
    assert rx.borrow_and_update() == 1


def test_receivers_have_slots() -> None:
    _tx, rx = watch_channel(0)
    assert not hasattr(rx, "__dict__")


async def test_distinct_iteration_skips_a_change_and_its_reversal() -> None:
    tx: WatchSender[str] = WatchSender("a")
    plain, distinct = tx.subscribe(), tx.subscribe(distinct=True)
    clone = distinct.clone()
    got: dict[str, list[str]] = {"plain": [], "distinct": [], "clone": []}

    async def consume(name: str, rx: WatchReceiver[str]) -> None:
        async for value in rx:
            got[name].append(value)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for name, rx in (("plain", plain), ("distinct", distinct), ("clone", clone)):
                tg.start_soon(consume, name, rx)
            await anyio.wait_all_tasks_blocked()
            tx.send("b")
            tx.send("a")
            await anyio.wait_all_tasks_blocked()
            tx.send("c")
            tx.close()
    assert got["plain"] == ["a", "a", "c"]
    assert got["distinct"] == ["a", "c"]
    assert got["clone"] == ["a", "c"]


async def test_dropping_the_sender_closes_the_channel() -> None:
    tx, rx = watch_channel(0)
    tx.send(1)
    del tx
    gc.collect()
    with anyio.fail_after(1):
        await rx.changed()
    assert rx.borrow() == 1
    with pytest.raises(ChannelClosed), anyio.fail_after(1):
        await rx.changed()


@pytest.mark.parametrize(("first", "second"), [("asyncio", "trio"), ("trio", "asyncio")])
def test_a_channel_outlives_the_event_loop_a_cancelled_waiter_ran_in(
    first: str, second: str
) -> None:
    tx, rx = watch_channel(0)

    async def cancelled_wait() -> None:
        with anyio.move_on_after(0.01):
            await rx.changed()

    async def real_wait() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rx.changed)
            await anyio.wait_all_tasks_blocked()
            tx.send(1)
        return rx.borrow()

    anyio.run(cancelled_wait, backend=first)
    assert anyio.run(real_wait, backend=second) == 1

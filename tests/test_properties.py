"""Property: what subscribers of a LeaderWatch see, whatever their speed."""

from __future__ import annotations

import itertools

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderwatch import Follower, Leader, LeaderWatch, Unknown
from leaderwatch.channel import WatchReceiver
from leaderwatch.state import observed_epoch

State = Leader | Follower | Unknown

EPOCHS = st.integers(min_value=0, max_value=6)
STATES: st.SearchStrategy[State] = st.one_of(
    st.builds(Leader, epoch=EPOCHS),
    st.builds(
        Follower,
        leader_endpoint=st.sampled_from([None, "a:1", "b:2"]),
        leader_epoch=st.none() | EPOCHS,
    ),
    st.just(Unknown()),
)


def leaders_by_epoch(states: list[State]) -> dict[int, set[str]]:
    """Who each delivered state names as leader of its epoch ("self" for Leader)."""
    leaders: dict[int, set[str]] = {}
    for state in states:
        match state:
            case Leader(epoch=epoch):
                leaders.setdefault(epoch, set()).add("self")
            case Follower(leader_endpoint=str() as endpoint, leader_epoch=int() as epoch):
                leaders.setdefault(epoch, set()).add(endpoint)
    return leaders


def is_subsequence(seen: list[State], delivered: list[State]) -> bool:
    remaining = iter(delivered)
    return all(any(item == candidate for candidate in remaining) for item in seen)


async def run_scenario(
    states: list[State], publisher_pauses: list[int], subscriber_speeds: list[int]
) -> tuple[list[State], list[list[State]]]:
    watch = LeaderWatch("prop")
    delivered: list[State] = [watch.current]
    seen: list[list[State]] = [[] for _ in subscriber_speeds]

    async def subscribe(rx: WatchReceiver[State], out: list[State], speed: int) -> None:
        async for state in rx:
            out.append(state)
            for _ in range(speed):
                await anyio.lowlevel.checkpoint()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for out, speed in zip(seen, subscriber_speeds, strict=True):
                tg.start_soon(subscribe, watch.subscribe(), out, speed)
            for index, state in enumerate(states):
                before = watch.current
                watch.publish(state)
                if watch.current != before:
                    delivered.append(watch.current)
                for _ in range(publisher_pauses[index % len(publisher_pauses)]):
                    await anyio.lowlevel.checkpoint()
            watch.close()
    return delivered, seen


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=60, deadline=None)
@given(
    states=st.lists(STATES, max_size=40),
    publisher_pauses=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    subscriber_speeds=st.lists(st.integers(0, 6), min_size=1, max_size=4),
)
def test_subscribers_see_a_deduplicated_monotonic_subsequence_ending_at_final(
    backend: str,
    states: list[State],
    publisher_pauses: list[int],
    subscriber_speeds: list[int],
) -> None:
    delivered, seen = anyio.run(
        run_scenario, states, publisher_pauses, subscriber_speeds, backend=backend
    )
    delivered_epochs = [e for e in map(observed_epoch, delivered) if e is not None]
    assert delivered_epochs == sorted(delivered_epochs)
    assert all(len(leaders) == 1 for leaders in leaders_by_epoch(delivered).values())
    for out in seen:
        assert out, "a subscriber must at least see the current value"
        assert out[-1] == delivered[-1]
        assert is_subsequence(out, delivered)
        assert all(a != b for a, b in itertools.pairwise(out))
        epochs = [e for e in map(observed_epoch, out) if e is not None]
        assert epochs == sorted(epochs)

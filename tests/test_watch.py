"""LeaderWatch: payload-aware dedup and the per-node epoch guard (contracts 4-5)."""

from __future__ import annotations

import anyio
import pytest
import structlog

from leaderwatch import (
    ChannelClosed,
    EpochConflict,
    EpochRegression,
    Follower,
    InvalidEndpoint,
    Leader,
    LeaderWatch,
    LeaderwatchError,
    Unknown,
)
from leaderwatch.testing import capture_events

pytestmark = pytest.mark.anyio


def test_initial_value_defaults_to_unknown() -> None:
    watch = LeaderWatch("n1")
    assert watch.current == Unknown()
    assert watch.subscribe().borrow() == Unknown()


def test_equal_value_is_suppressed_and_wakes_nobody() -> None:
    watch = LeaderWatch("n1", initial=Leader(epoch=3))
    rx = watch.subscribe()
    assert watch.publish(Leader(epoch=3)) is False
    assert not rx.has_changed()
    assert watch.stats.suppressed == 1
    assert watch.stats.delivered == 0


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Leader(epoch=3), Leader(epoch=4)),
        (
            Follower(leader_endpoint="a:1", leader_epoch=4),
            Follower(leader_endpoint="a:1", leader_epoch=5),
        ),
        (
            Follower(leader_endpoint="a:1", leader_epoch=4),
            Follower(leader_endpoint="A:1", leader_epoch=4),
        ),
        (Follower(leader_endpoint="a:1"), Follower(leader_endpoint="b:1")),
        (Follower(leader_endpoint="a:1"), Follower()),
        (Follower(), Unknown()),
        (Leader(epoch=4), Follower(leader_endpoint="b:1", leader_epoch=5)),
        (Leader(epoch=4), Follower(leader_epoch=4)),
    ],
)
def test_any_payload_change_is_delivered(
    before: Leader | Follower | Unknown, after: Leader | Follower | Unknown
) -> None:
    watch = LeaderWatch("n1")
    watch.publish(before)
    rx = watch.subscribe()
    assert watch.publish(after) is True
    assert rx.has_changed()
    assert rx.borrow_and_update() == after
    assert watch.current == after


def test_none_epoch_is_always_allowed_and_moves_nothing() -> None:
    watch = LeaderWatch("n1")
    watch.publish(Leader(epoch=9))
    assert watch.publish(Follower(leader_endpoint="b:1")) is True
    assert watch.high_water == 9
    assert watch.publish(Follower(leader_endpoint="c:1", leader_epoch=8)) is False
    assert watch.stats.regressions == 1


def test_regression_is_never_delivered_and_unknown_takes_its_place() -> None:
    watch = LeaderWatch("n1")
    rx = watch.subscribe()
    watch.publish(Leader(epoch=7))
    rx.borrow_and_update()
    with capture_events() as logs:
        assert watch.publish(Leader(epoch=6)) is False
    assert rx.borrow_and_update() == Unknown()
    assert watch.current == Unknown()
    assert watch.stats.regressions == 1
    regression = [entry for entry in logs if entry["event"] == "leader_state_epoch_regression"]
    assert len(regression) == 1
    assert regression[0]["log_level"] == "error"
    assert regression[0]["node_id"] == "n1"
    assert regression[0]["high_water"] == 7
    assert regression[0]["state"] == {"kind": "leader", "epoch": 6}


def test_one_high_water_mark_across_leader_and_follower() -> None:
    watch = LeaderWatch("n1")
    watch.publish(Follower(leader_endpoint="a:1", leader_epoch=10))
    assert watch.publish(Leader(epoch=9)) is False
    assert watch.current == Unknown()
    assert watch.publish(Leader(epoch=11)) is True
    assert watch.publish(Follower(leader_endpoint="a:1", leader_epoch=10)) is False
    assert watch.current == Unknown()
    assert watch.publish(Follower(leader_endpoint="a:1", leader_epoch=12)) is True


def test_regression_while_follower_then_equal_unknown_is_counted_once() -> None:
    watch = LeaderWatch("n1")
    watch.publish(Leader(epoch=5))
    watch.publish(Unknown())
    rx = watch.subscribe()
    assert watch.publish(Leader(epoch=4)) is False
    assert not rx.has_changed()
    assert watch.stats.regressions == 1
    assert watch.stats.suppressed == 0


def test_initial_value_sets_the_high_water_mark() -> None:
    watch = LeaderWatch("n1", initial=Leader(epoch=5))
    assert watch.high_water == 5
    assert watch.publish(Leader(epoch=4)) is False
    assert watch.current == Unknown()


def test_strict_mode_raises_after_publishing_unknown() -> None:
    watch = LeaderWatch("n1", strict=True)
    rx = watch.subscribe()
    watch.publish(Leader(epoch=3))
    with pytest.raises(EpochRegression, match="high-water") as raised:
        watch.publish(Leader(epoch=2))
    assert raised.value.high_water == 3
    assert raised.value.state == Leader(epoch=2)
    assert rx.borrow() == Unknown()
    assert watch.stats.regressions == 1


def test_each_delivered_transition_is_logged_once() -> None:
    watch = LeaderWatch("n1")
    with capture_events() as logs:
        watch.publish(Leader(epoch=1))
        watch.publish(Leader(epoch=1))
        watch.publish(Follower(leader_endpoint="b:2", leader_epoch=2))
    changed = [entry for entry in logs if entry["event"] == "leader_state_changed"]
    assert [(entry["from"], entry["to"]) for entry in changed] == [
        ({"kind": "unknown"}, {"kind": "leader", "epoch": 1}),
        (
            {"kind": "leader", "epoch": 1},
            {"kind": "follower", "leader_endpoint": "b:2", "leader_epoch": 2},
        ),
    ]
    assert all(entry["log_level"] == "info" and entry["node_id"] == "n1" for entry in changed)


def test_stats_count_everything() -> None:
    watch = LeaderWatch("n1")
    for state in (Leader(epoch=1), Leader(epoch=1), Leader(epoch=2), Leader(epoch=1), Unknown()):
        watch.publish(state)
    stats = watch.stats
    assert (stats.delivered, stats.suppressed, stats.regressions) == (3, 2, 1)


def test_publish_rejects_non_states() -> None:
    watch = LeaderWatch("n1")
    with pytest.raises(TypeError, match="LeaderState"):
        watch.publish("leader")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LeaderState"):
        LeaderWatch("n1", initial=7)  # type: ignore[arg-type]


def test_publish_after_close_raises() -> None:
    watch = LeaderWatch("n1")
    watch.close()
    watch.close()
    assert watch.is_closed
    with pytest.raises(ChannelClosed):
        watch.publish(Leader(epoch=1))
    assert watch.high_water is None


async def test_subscribers_iterate_until_close() -> None:
    seen: list[Leader | Follower | Unknown] = []

    async with LeaderWatch("n1") as watch:

        async def consume() -> None:
            async for state in watch.subscribe():
                seen.append(state)

        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.wait_all_tasks_blocked()
                watch.publish(Leader(epoch=1))
                await anyio.wait_all_tasks_blocked()
                watch.publish(Leader(epoch=1))
                watch.publish(Follower(leader_endpoint="b:1", leader_epoch=2))
                await anyio.wait_all_tasks_blocked()
                watch.close()
    assert seen == [Unknown(), Leader(epoch=1), Follower(leader_endpoint="b:1", leader_epoch=2)]


def test_library_does_not_configure_logging() -> None:
    before = structlog.get_config()
    LeaderWatch("n1").publish(Leader(epoch=1))
    assert structlog.get_config() == before


# --- contract 4: one epoch never names two leaders ---------------------------------------------

CONFLICTS = [
    pytest.param(
        [Follower(leader_endpoint="b:1", leader_epoch=2)],
        Leader(epoch=2),
        "b:1",
        id="leader-after-following-another-node",
    ),
    pytest.param(
        [Leader(epoch=2)],
        Follower(leader_endpoint="b:1", leader_epoch=2),
        "this node",
        id="following-another-node-after-leading",
    ),
    pytest.param(
        [Follower(leader_endpoint="b:1", leader_epoch=2)],
        Follower(leader_endpoint="c:1", leader_epoch=2),
        "b:1",
        id="two-other-leaders",
    ),
    pytest.param(
        [Follower(leader_endpoint="b:1", leader_epoch=2), Unknown()],
        Leader(epoch=2),
        "b:1",
        id="unknown-in-between-forgets-nothing",
    ),
    pytest.param(
        [Leader(epoch=2), Follower(leader_epoch=2), Follower()],
        Follower(leader_endpoint="b:1", leader_epoch=2),
        "this node",
        id="epochless-and-leaderless-in-between-forget-nothing",
    ),
    pytest.param(
        [Follower(leader_endpoint="b:1", leader_epoch=2), Follower(leader_epoch=2)],
        Leader(epoch=2),
        "b:1",
        id="leaderless-follower-in-between-forgets-nothing",
    ),
]


@pytest.mark.parametrize(("before", "offered", "leader"), CONFLICTS)
def test_same_epoch_different_leader_is_refused_like_a_regression(
    before: list[Leader | Follower | Unknown],
    offered: Leader | Follower,
    leader: str,
) -> None:
    watch = LeaderWatch("n1")
    for state in before:
        watch.publish(state)
    rx = watch.subscribe()
    with capture_events() as logs:
        assert watch.publish(offered) is False
    assert watch.current == Unknown()
    assert rx.borrow_and_update() == Unknown()
    assert watch.stats.conflicts == 1
    assert watch.stats.regressions == 0
    assert watch.high_water == 2
    conflict = [entry for entry in logs if entry["event"] == "leader_state_epoch_conflict"]
    assert len(conflict) == 1
    assert conflict[0]["log_level"] == "error"
    assert conflict[0]["node_id"] == "n1"
    assert conflict[0]["epoch"] == 2
    assert conflict[0]["epoch_leader"] == leader
    assert conflict[0]["state"] == offered.model_dump(mode="json")
    assert not [entry for entry in logs if entry["event"] == "leader_state_changed"][1:]


def test_the_defect_sequence_never_shows_a_second_leader_at_one_epoch() -> None:
    """Issue 11: Leader(2) -> Follower(other, 2) -> Leader(2) after the store lost its data."""
    watch = LeaderWatch("n1")
    seen = []
    for state in (
        Leader(epoch=2),
        Follower(leader_endpoint="other:1", leader_epoch=2),
        Leader(epoch=2),
        Follower(leader_endpoint="other:1", leader_epoch=2),
    ):
        watch.publish(state)
        seen.append(watch.current)
    # Once two leaders were claimed at epoch 2, no leader at epoch 2 is shown again.
    assert seen == [Leader(epoch=2), Unknown(), Unknown(), Unknown()]
    assert watch.stats.conflicts == 3
    assert watch.publish(Follower(leader_epoch=2)) is True
    assert watch.publish(Follower(leader_endpoint="other:1", leader_epoch=3)) is True
    assert watch.publish(Leader(epoch=4)) is True


SAME_LEADER = [
    pytest.param(
        [Leader(epoch=2)], Follower(leader_epoch=2), None, id="leaderless-follower-after-leading"
    ),
    pytest.param(
        [Follower(leader_epoch=2)], Leader(epoch=2), None, id="leading-after-leaderless-follower"
    ),
    pytest.param(
        [Follower(leader_endpoint="b:1", leader_epoch=2)],
        Follower(leader_endpoint="B:1", leader_epoch=2),
        None,
        id="same-leader-other-spelling",
    ),
    pytest.param(
        [Follower(leader_endpoint="[::ffff:10.0.0.2]:1", leader_epoch=2)],
        Follower(leader_endpoint="10.0.0.2:1", leader_epoch=2),
        None,
        id="same-leader-ipv4-mapped",
    ),
    pytest.param(
        [Follower(leader_endpoint="Me:9000", leader_epoch=2)],
        Leader(epoch=2),
        "me:9000",
        id="leading-after-following-itself",
    ),
    pytest.param(
        [Leader(epoch=2)],
        Follower(leader_endpoint="me:9000", leader_epoch=2),
        "me:9000",
        id="following-itself-after-leading",
    ),
    pytest.param(
        [Follower(leader_endpoint="b:1", leader_epoch=2)],
        Leader(epoch=3),
        None,
        id="a-new-epoch-is-a-new-leader",
    ),
]


@pytest.mark.parametrize(("before", "offered", "self_endpoint"), SAME_LEADER)
def test_same_epoch_same_leader_is_delivered(
    before: list[Leader | Follower | Unknown],
    offered: Leader | Follower,
    self_endpoint: str | None,
) -> None:
    watch = LeaderWatch("n1", self_endpoint=self_endpoint)
    for state in before:
        watch.publish(state)
    assert watch.publish(offered) is True
    assert watch.current == offered
    assert watch.stats.conflicts == 0


def test_without_self_endpoint_every_named_leader_is_another_node() -> None:
    watch = LeaderWatch("n1")
    watch.publish(Follower(leader_endpoint="me:9000", leader_epoch=2))
    assert watch.publish(Leader(epoch=2)) is False
    assert watch.stats.conflicts == 1


def test_self_endpoint_must_be_valid() -> None:
    with pytest.raises(InvalidEndpoint, match="scheme"):
        LeaderWatch("n1", self_endpoint="http://me:9000")


def test_initial_value_names_the_leader_of_its_epoch() -> None:
    watch = LeaderWatch("n1", initial=Follower(leader_endpoint="b:1", leader_epoch=5))
    assert watch.publish(Leader(epoch=5)) is False
    assert watch.stats.conflicts == 1


def test_strict_mode_raises_epoch_conflict_after_publishing_unknown() -> None:
    watch = LeaderWatch("n1", strict=True)
    rx = watch.subscribe()
    watch.publish(Follower(leader_endpoint="b:1", leader_epoch=3))
    with pytest.raises(EpochConflict, match="b:1") as raised:
        watch.publish(Leader(epoch=3))
    assert isinstance(raised.value, LeaderwatchError)
    assert raised.value.epoch == 3
    assert raised.value.epoch_leader == "b:1"
    assert raised.value.state == Leader(epoch=3)
    assert rx.borrow() == Unknown()
    assert watch.stats.conflicts == 1

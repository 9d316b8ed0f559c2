"""The etcd driver's pure parts: store history (has etcd gone back?), key shapes, stored values."""

from __future__ import annotations

import math

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaderwatch.drivers.etcd._floor import floor_from_value
from leaderwatch.drivers.etcd._history import StoreHistory
from leaderwatch.drivers.etcd._keys import ElectionKeys
from leaderwatch.drivers.etcd._observer import endpoint_from_value
from leaderwatch.state import InvalidEndpoint
from leaderwatch.testing import capture_events

CLUSTER = 0xC1
OTHER_CLUSTER = 0xC2
SETTLE = 2.0


def history() -> StoreHistory:
    return StoreHistory(node_id="n", settle=SETTLE)


def reply(store: StoreHistory, revision: int, *, cluster: int = CLUSTER, now: float = 0.0) -> None:
    """A reply to a request sent just now."""
    store.note_reply(revision, cluster, sent=store.mark(), endpoint="e:1", now=now)


def events(logs: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [log for log in logs if log["event"] == name]


def test_a_store_that_keeps_its_data_never_goes_back() -> None:
    store = history()
    with capture_events() as logs:
        for revision in (5, 5, 9, 40):
            reply(store, revision)
    assert (store.high_water, store.floor, store.revision) == (40, 0, 40)
    assert not store.needs_catch_up
    assert not store.behind
    assert store.settled_at == -math.inf
    assert logs == []


def test_replies_to_requests_in_flight_together_may_arrive_in_any_order() -> None:
    store = history()
    reply(store, 10)
    early, late = store.mark(), store.mark()
    store.note_reply(30, CLUSTER, sent=late, endpoint="e:1", now=0)
    store.note_reply(20, CLUSTER, sent=early, endpoint="e:1", now=0)  # sent at 10: fine
    assert (store.floor, store.high_water) == (0, 30)


def test_a_lower_revision_than_seen_when_sent_is_a_store_that_went_back() -> None:
    store = history()
    reply(store, 400)
    with capture_events() as logs:
        reply(store, 1, now=10.0)
        reply(store, 2, now=10.5)  # the same episode: said once
    (went_back,) = events(logs, "etcd_store_went_back")
    assert went_back["log_level"] == "error"
    assert (went_back["revision"], went_back["high_water"]) == (1, 400)
    assert store.floor == 400
    assert store.behind
    assert store.needs_catch_up
    assert store.settled_at == 10.0 + SETTLE
    # High-water now follows the store as it is; the floor stays.
    assert store.high_water == 2

    with capture_events() as logs:
        store.note_floor_key(400, now=11)
        reply(store, 399, now=11)
        assert store.needs_catch_up
        reply(store, 400, now=12)
    assert not store.needs_catch_up
    (caught_up,) = events(logs, "etcd_store_caught_up")
    assert (caught_up["revision"], caught_up["floor"]) == (400, 400)
    assert not events(logs, "etcd_store_went_back")
    assert store.settled_at == 10.0 + SETTLE  # not pushed back by later replies


def test_a_reply_to_a_request_sent_before_the_store_went_back_is_ignored() -> None:
    store = history()
    reply(store, 400)
    in_flight = store.mark()
    reply(store, 1)
    with capture_events() as logs:
        store.note_reply(350, CLUSTER, sent=in_flight, endpoint="e:1", now=0)
    assert logs == []
    assert (store.revision, store.high_water, store.floor) == (1, 1, 400)


def test_another_cluster_id_is_a_store_that_went_back_even_at_a_higher_revision() -> None:
    store = history()
    reply(store, 50)
    with capture_events() as logs:
        reply(store, 900, cluster=OTHER_CLUSTER, now=3.0)
    (went_back,) = events(logs, "etcd_store_went_back")
    assert went_back["previous_cluster_id"] == f"{CLUSTER:x}"
    assert went_back["cluster_id"] == f"{OTHER_CLUSTER:x}"
    assert store.floor == 50
    assert not store.behind
    assert store.needs_catch_up  # the floor key does not hold the floor yet
    assert store.settled_at == 3.0 + SETTLE
    store.note_floor_key(50, now=4)
    assert not store.needs_catch_up


def test_a_second_going_back_after_catching_up_is_said_again() -> None:
    store = history()
    reply(store, 100)
    reply(store, 1)
    store.note_floor_key(100, now=0)
    reply(store, 120)
    with capture_events() as logs:
        reply(store, 1, now=50)
    assert len(events(logs, "etcd_store_went_back")) == 1
    assert store.floor == 120
    assert store.settled_at == 50 + SETTLE


def test_a_floor_another_node_wrote_raises_the_floor_and_makes_this_node_settle() -> None:
    store = history()
    reply(store, 5, now=1.0)
    with capture_events() as logs:
        store.note_floor_key(700, now=2.0)
    assert logs == []  # this node saw nothing go back
    assert store.floor == 700
    assert store.behind
    assert store.settled_at == 2.0 + SETTLE
    store.note_floor_key(3, now=3.0)  # the floor never decreases
    assert store.floor == 700


def test_a_floor_that_rose_since_this_node_read_it_makes_it_settle_though_etcd_is_past_it() -> None:
    # Another node saw the store go back and moved etcd past the old revisions before
    # this node's next reply: only the floor key rising tells this node. The leader of
    # the old store may still trust its lease: this node waits a ttl before campaigning.
    store = history()
    reply(store, 130, now=1.0)
    store.note_floor_key(0, now=1.0)
    assert store.settled_at == -math.inf
    reply(store, 140, now=2.0)  # the wiped store, already moved past the floor
    with capture_events() as logs:
        store.note_floor_key(131, now=2.5)
    assert store.settled_at == 2.5 + SETTLE
    assert not store.behind
    (rose,) = events(logs, "etcd_revision_floor_rose")
    assert (rose["floor"], rose["previous_floor"]) == (131, 0)
    store.note_floor_key(131, now=9.0)  # the same floor again: nothing new
    assert store.settled_at == 2.5 + SETTLE


def test_a_floor_found_on_the_first_read_does_not_delay_a_new_node() -> None:
    store = history()
    reply(store, 5_000, now=1.0)
    store.note_floor_key(131, now=1.0)  # written by an episode long over
    assert store.floor == 131
    assert store.settled_at == -math.inf


@pytest.mark.anyio
async def test_waiting_for_a_change_wakes_on_the_next_reply() -> None:
    store = history()
    woke: list[int] = []

    async def wait() -> None:
        await store.wait_changed()
        woke.append(store.revision)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        reply(store, 7)
    assert woke == [7]


def test_only_keys_of_the_recipe_shape_are_candidates() -> None:
    keys = ElectionKeys("app")
    for key in (
        b"app/1",
        b"app/694d8b0f1c2a3e4f",
        b"app/7fffffffffffffff",
        b"app/abc",
        b"app/0694d8b0f1c2a3e4",  # etcdctl lease grant pads to 16 digits
    ):
        assert keys.is_candidate(key), key
    for key in (
        b"app/",
        b"app/0",  # not a lease id
        b"app/0000000000000000",
        b"app/ABC",
        b"app/8000000000000000",  # not an int64 lease id
        b"app/12345678901234567",
        b"app/sub/1a",  # a nested election
        b"app/1a/",
        b"app/xyz",
        b"app/1a\n",
        b"ap/1a",
        b"app.revision-floor",
        b"apps/1a",
    ):
        assert not keys.is_candidate(key), key
    assert keys.candidate(0x1A) == b"app/1a"
    assert keys.is_candidate(keys.candidate(2**63 - 1))
    assert keys.revision_floor == b"app.revision-floor"
    assert not keys.revision_floor.startswith(keys.prefix)


@pytest.mark.parametrize(
    ("value", "revision"),
    [(b"0", 0), (b"1", 1), (b"400", 400), (str(2**63 - 1).encode(), 2**63 - 1)],
)
def test_a_floor_value_is_a_decimal_revision(value: bytes, revision: int) -> None:
    assert floor_from_value(value) == revision


@pytest.mark.parametrize(
    "value",
    [b"", b"-1", b"01", b"+5", b" 5", b"5\n", b"1e3", b"0x10", str(2**63).encode(), b"\xff"],
)
def test_anything_else_is_not_a_floor(value: bytes) -> None:
    assert floor_from_value(value) is None


@given(st.binary(max_size=64))
def test_floor_values_never_raise(value: bytes) -> None:
    revision = floor_from_value(value)
    assert revision is None or (0 <= revision < 2**63 and str(revision).encode() == value)


def test_a_leader_value_must_be_an_endpoint() -> None:
    assert endpoint_from_value(b"10.0.0.7:9000") == "10.0.0.7:9000"
    with pytest.raises(InvalidEndpoint, match="UTF-8"):
        endpoint_from_value(b"\xff:1")
    with pytest.raises(InvalidEndpoint, match="scheme"):
        endpoint_from_value(b"http://10.0.0.7:9000")
    with pytest.raises(InvalidEndpoint, match="bytes"):
        endpoint_from_value(b"a" * 100_000)

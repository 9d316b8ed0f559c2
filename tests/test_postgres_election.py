"""PostgresElectionDriver against a real PostgreSQL server, in one process.

asyncpg runs on asyncio only, so these tests run on the asyncio backend; one
test checks that trio gets a clear error.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest
import trio
from pg_server import PostgresServer, free_port

from leaderwatch.drivers.postgres import (
    PostgresAuthError,
    PostgresDsnError,
    PostgresElectionDriver,
    PostgresElectionError,
    PostgresPermissionError,
    PostgresUnavailable,
    schema_ddl,
)
from leaderwatch.state import Follower, InvalidEndpoint, Leader, Unknown, observed_epoch
from leaderwatch.testing import capture_events

State = Leader | Follower | Unknown
TTL = 2
MARGIN = 0.5  # the default for ttl=2
PROOF = TTL - MARGIN
RENEW = PROOF / 3
SLACK = 0.25  # event-loop wake-up and scheduling on a loaded 2-core runner
assert SLACK < MARGIN  # else "stepped down before the lease could expire" would prove nothing
A, B, C = "10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.3:7003"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def election() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def driver(
    postgres: PostgresServer, election: str, endpoint: str | None = None, **options: Any
) -> PostgresElectionDriver:
    options.setdefault("ttl", TTL)
    return PostgresElectionDriver(
        postgres.dsn, election=election, node_endpoint=endpoint, **options
    )


class Node:
    """A driver running in its own task, with every value it published and when."""

    def __init__(self, driver: PostgresElectionDriver) -> None:
        self.driver = driver
        self.seen: list[tuple[float, State]] = []
        self._changed = anyio.Event()
        self._stop = anyio.Event()
        self._done = anyio.Event()

    @property
    def state(self) -> State:
        return self.seen[-1][1]

    @property
    def states(self) -> list[State]:
        return [state for _, state in self.seen]

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with self.driver, anyio.create_task_group() as task_group:
                task_group.start_soon(self._record)
                task_status.started()
                await self._stop.wait()
                task_group.cancel_scope.cancel()
        finally:
            self._note(self.driver.current)
            self._done.set()

    async def _record(self) -> None:
        async for state in self.driver.leadership():
            self._note(state)

    def _note(self, state: State) -> None:
        if not self.seen or self.seen[-1][1] != state:
            self.seen.append((anyio.current_time(), state))
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_for(self, predicate: Callable[[State], bool], within: float = 10.0) -> State:
        with anyio.fail_after(within):
            while not (self.seen and predicate(self.state)):
                await self._changed.wait()
        return self.state

    async def exit(self) -> float:
        """Leave ``async with`` (resign); return the time just before."""
        started = anyio.current_time()
        self._stop.set()
        with anyio.fail_after(5):
            await self._done.wait()
        return started


async def start(task_group: anyio.abc.TaskGroup, driver: PostgresElectionDriver) -> Node:
    node = Node(driver)
    await task_group.start(node.run)
    return node


def is_leader(state: State) -> bool:
    return isinstance(state, Leader)


def is_unknown(state: State) -> bool:
    return state == Unknown()


def follows(endpoint: str | None, epoch: int) -> Callable[[State], bool]:
    return lambda state: state == Follower(leader_endpoint=endpoint, leader_epoch=epoch)


def led_above(epoch: int) -> Callable[[State], bool]:
    return lambda state: isinstance(state, Leader) and state.epoch > epoch


@contextlib.asynccontextmanager
async def session(dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def row(postgres: PostgresServer, election: str, schema: str = "leaderwatch") -> Any:
    async with session(postgres.dsn) as conn:
        return await conn.fetchrow(
            f"SELECT *, lease_expires_at > now() AS live FROM {schema}.elections "
            "WHERE election = $1",
            election,
        )


async def execute(postgres: PostgresServer, query: str, *args: object) -> None:
    async with session(postgres.dsn) as conn:
        await conn.execute(query, *args)


async def converged(candidates: list[Node], *others: Node, within: float = 10.0) -> Leader:
    """Wait until one candidate leads and every other node follows it; return its state."""
    with anyio.fail_after(within):
        while True:
            leaders = [node for node in candidates if is_leader(node.state)]
            if len(leaders) == 1:
                state = leaders[0].state
                assert isinstance(state, Leader)
                expected = Follower(
                    leader_endpoint=leaders[0].driver.node_endpoint, leader_epoch=state.epoch
                )
                rest = [node for node in [*candidates, *others] if node is not leaders[0]]
                if all(node.state == expected for node in rest):
                    return state
            await anyio.sleep(0.01)


def assert_epochs_never_decrease(*nodes: Node) -> None:
    for node in nodes:
        epochs = [epoch for state in node.states if (epoch := observed_epoch(state)) is not None]
        assert epochs == sorted(epochs), node.states
        assert node.driver.stats.regressions == 0, node.states


def assert_one_leader_per_epoch(*nodes: Node) -> None:
    owners: dict[int, int] = {}
    for index, node in enumerate(nodes):
        for state in node.states:
            if isinstance(state, Leader):
                assert owners.setdefault(state.epoch, index) == index, "two leaders at one epoch"


async def poll(condition: Callable[[], object], within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.02)


def events(logs: list[dict[str, Any]], name: str, **fields: object) -> list[dict[str, Any]]:
    return [
        log
        for log in logs
        if log["event"] == name and all(log.get(key) == value for key, value in fields.items())
    ]


# -- the table and hand-over ----------------------------------------------------------


@pytest.mark.anyio
async def test_the_row_names_the_leader_and_a_graceful_exit_hands_over_at_once(
    postgres: PostgresServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        observer = await start(task_group, driver(postgres, election))
        first = await start(task_group, driver(postgres, election, A, ttl=30))
        old = await first.wait_for(is_leader)
        assert isinstance(old, Leader)
        second = await start(task_group, driver(postgres, election, B, ttl=30))
        await second.wait_for(follows(A, old.epoch))
        await observer.wait_for(follows(A, old.epoch))
        held = await row(postgres, election)
        assert (held["holder_endpoint"], held["holder_node_id"], held["epoch"]) == (
            A,
            A,
            old.epoch,
        )
        assert held["live"]
        assert first.driver.tenure_epoch == old.epoch

        # The lease is released on exit: the successor leads long before ttl=30 s.
        sent = await first.exit()
        new = await second.wait_for(is_leader, within=2)
        took_over = second.seen[-1][0]
        assert new == Leader(epoch=old.epoch + 1)
        assert took_over - sent < 1.0
        await observer.wait_for(follows(B, new.epoch), within=2)
        held = await row(postgres, election)
        assert (held["holder_endpoint"], held["epoch"], held["live"]) == (B, new.epoch, True)
        task_group.cancel_scope.cancel()
    assert first.states == [Unknown(), old, Unknown()]
    assert second.states[-2:] == [new, Unknown()]
    released = await row(postgres, election)
    assert released["epoch"] == new.epoch
    assert not released["live"]
    assert_one_leader_per_epoch(first, second)
    assert_epochs_never_decrease(first, second, observer)


@pytest.mark.anyio
async def test_observer_sees_unknown_without_a_row_and_after_release(
    postgres: PostgresServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        observer = await start(task_group, driver(postgres, election))
        assert observer.driver.current == Unknown()
        assert observer.driver.proven_until == -float("inf")
        candidate = await start(task_group, driver(postgres, election, A))
        leader = await candidate.wait_for(is_leader)
        assert isinstance(leader, Leader)
        await observer.wait_for(follows(A, leader.epoch))
        await candidate.exit()
        await observer.wait_for(is_unknown, within=1)
        task_group.cancel_scope.cancel()
    assert observer.states[-2:] == [
        Follower(leader_endpoint=A, leader_epoch=leader.epoch),
        Unknown(),
    ]


@pytest.mark.anyio
async def test_the_first_value_after_start_up_is_what_the_database_holds(
    postgres: PostgresServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        async with driver(postgres, election) as observer:
            assert observer.current == Unknown()
        leader = await start(task_group, driver(postgres, election, A, ttl=10))
        state = await leader.wait_for(is_leader)
        assert isinstance(state, Leader)
        expected = Follower(leader_endpoint=A, leader_epoch=state.epoch)
        async with driver(postgres, election) as observer:
            assert observer.current == expected
        async with driver(postgres, election, B) as candidate:
            assert candidate.current == expected
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_proven_until_is_ttl_minus_margin_after_the_last_acknowledged_renewal(
    postgres: PostgresServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        node = await start(task_group, driver(postgres, election, A))
        follower = await start(task_group, driver(postgres, election, B))
        await node.wait_for(is_leader)
        for _ in range(3):
            await anyio.sleep(RENEW)
            now = anyio.current_time()
            proven = node.driver.proven_until
            # Renewed every RENEW seconds, each proving PROOF seconds from its send.
            assert now < proven <= now + PROOF
            assert proven > now + PROOF - RENEW - SLACK
        assert follower.driver.proven_until == -float("inf")
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_resign_hands_over_keeps_observing_and_never_campaigns_again(
    postgres: PostgresServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        first = await start(task_group, driver(postgres, election, A, ttl=10))
        old = await first.wait_for(is_leader)
        assert isinstance(old, Leader)
        second = await start(task_group, driver(postgres, election, B, ttl=10))
        await second.wait_for(follows(A, old.epoch))

        await first.driver.resign()
        assert first.driver.current == Unknown() or isinstance(first.driver.current, Follower)
        assert not first.driver.campaigning
        assert first.driver.proven_until == -float("inf")
        new = await second.wait_for(is_leader, within=2)
        assert new == Leader(epoch=old.epoch + 1)
        await first.wait_for(follows(B, old.epoch + 1), within=2)

        # With the only other candidate gone, the resigned node still never leads.
        await second.exit()
        await first.wait_for(is_unknown, within=2)
        await anyio.sleep(3 * RENEW)
        held = await row(postgres, election)
        assert (held["holder_endpoint"], held["live"]) == (B, False)
        task_group.cancel_scope.cancel()
    after = first.states[first.states.index(old) + 1 :]
    assert not any(is_leader(state) for state in after), first.states


@pytest.mark.anyio
async def test_a_row_with_a_bad_endpoint_gives_follower_none_and_one_warning(
    postgres: PostgresServer, election: str
) -> None:
    await execute(
        postgres,
        "INSERT INTO leaderwatch.elections (election, epoch, holder_endpoint, holder_node_id, "
        "holder_token, lease_expires_at) VALUES ($1, 41, 'http://10.0.0.9:80', 'other-program', "
        "gen_random_uuid(), now() + interval '30 seconds')",
        election,
    )
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(postgres, election))
            candidate = await start(task_group, driver(postgres, election, A))
            for node in (observer, candidate):
                await node.wait_for(follows(None, 41))
            await anyio.sleep(3 * RENEW)  # several polls of the same row
            # Another program changes the row: the trigger wakes the observers.
            await execute(
                postgres,
                "UPDATE leaderwatch.elections SET epoch = 42, holder_endpoint = 'no port' "
                "WHERE election = $1",
                election,
            )
            for node in (observer, candidate):
                await node.wait_for(follows(None, 42), within=1)
            await execute(
                postgres,
                "UPDATE leaderwatch.elections SET lease_expires_at = now() WHERE election = $1",
                election,
            )
            # Its lease given up, the candidate takes over above it.
            assert await candidate.wait_for(is_leader, within=2) == Leader(epoch=43)
            task_group.cancel_scope.cancel()
    warnings = events(logs, "postgres_holder_endpoint_invalid", node_id=observer.driver.node_id)
    assert [(log["epoch"], log["holder_endpoint"]) for log in warnings] == [
        (41, "http://10.0.0.9:80"),
        (42, "no port"),
    ]
    assert all(log["log_level"] == "warning" for log in warnings)
    assert "scheme" in warnings[0]["reason"]


# -- lease safety and failures ---------------------------------------------------------


@pytest.mark.anyio
async def test_frozen_database_makes_the_leader_step_down_before_its_lease_can_expire(
    postgres: PostgresServer, election: str
) -> None:
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(postgres, election))
            first = await start(task_group, driver(postgres, election, A))
            old = await first.wait_for(is_leader)
            assert isinstance(old, Leader)
            second = await start(task_group, driver(postgres, election, B))
            await second.wait_for(follows(A, old.epoch))
            await observer.wait_for(follows(A, old.epoch))

            bystander = await start(task_group, driver(postgres, election))
            await bystander.wait_for(follows(A, old.epoch))

            paused = postgres.pause()
            try:
                for node in (first, second, observer):
                    await node.wait_for(is_unknown, within=PROOF + 1)
                # Leaving never hangs on a frozen database.
                left = await bystander.exit()
                assert anyio.current_time() - left < first.driver.timing.resign_wait + SLACK
                # Stay frozen past the lease's expiry on the server.
                await anyio.sleep_until(paused + TTL + 0.3)
            finally:
                resumed = postgres.resume()
            leader = await converged([first, second], observer)
            task_group.cancel_scope.cancel()

    lost = events(logs, "postgres_tenure_lost", node_id=A, reason="lease_unproven")
    assert len(lost) == 1, lost
    assert lost[0]["proven_until"] - lost[0]["last_acked_send"] == pytest.approx(PROOF)
    assert lost[0]["last_acked_send"] <= paused
    step_down = next(t for t, state in first.seen if t >= paused and is_unknown(state))
    # No later than ttl - margin after the last acknowledged renewal was sent,
    # hence before the server (which ran it later) could expire the lease.
    assert step_down <= lost[0]["proven_until"] + SLACK
    assert step_down < lost[0]["last_acked_send"] + TTL
    unseen = next(t for t, state in observer.seen if t >= paused and is_unknown(state))
    assert unseen <= paused + PROOF + SLACK
    for node in (first, second, observer):
        assert not any(
            is_leader(state) for t, state in node.seen if paused + PROOF + SLACK < t < resumed
        ), node.seen
    assert events(logs, "postgres_unreachable", node_id=observer.driver.node_id)
    reconnected = events(logs, "postgres_reconnected", node_id=observer.driver.node_id)
    assert reconnected
    assert observer.driver.reconnects == len(reconnected)
    assert leader.epoch > old.epoch
    assert_epochs_never_decrease(first, second, observer)
    assert_one_leader_per_epoch(first, second)


@pytest.mark.anyio
async def test_a_row_lock_that_outlasts_the_lease_times_renewals_out_and_the_leader_steps_down(
    postgres: PostgresServer, election: str
) -> None:
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            first = await start(task_group, driver(postgres, election, A))
            old = await first.wait_for(is_leader)
            assert isinstance(old, Leader)
            second = await start(task_group, driver(postgres, election, B))
            await second.wait_for(follows(A, old.epoch))
            async with session(postgres.dsn) as blocker, blocker.transaction():
                locked = anyio.current_time()
                await blocker.execute(
                    "SELECT * FROM leaderwatch.elections WHERE election = $1 FOR UPDATE",
                    election,
                )
                await first.wait_for(is_unknown, within=PROOF + 1)
                await anyio.sleep_until(locked + TTL + 0.2)
            leader = await converged([first, second])
            task_group.cancel_scope.cancel()
    step_down = next(t for t, state in first.seen if t >= locked and is_unknown(state))
    assert step_down <= locked + PROOF + SLACK
    failures = events(logs, "postgres_request_failed", node_id=A)
    assert failures
    assert any(
        "statement timeout" in log["error"] or "no answer" in log["error"] for log in failures
    )
    assert leader.epoch > old.epoch
    assert_epochs_never_decrease(first, second)
    assert_one_leader_per_epoch(first, second)


@pytest.mark.anyio
async def test_a_lost_connection_is_reopened_and_the_leader_keeps_its_epoch(
    postgres: PostgresServer, election: str
) -> None:
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(postgres, election, ttl=10))
            leader = await start(task_group, driver(postgres, election, A, ttl=10))
            state = await leader.wait_for(is_leader)
            assert isinstance(state, Leader)
            await observer.wait_for(follows(A, state.epoch))
            await execute(
                postgres,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'leaderwatch %' AND pid <> pg_backend_pid()",
            )
            await anyio.sleep(1.0)
            # Both reconnected; the lease outlived the connection, so nothing changed.
            task_group.cancel_scope.cancel()
    assert leader.states == [Unknown(), state, Unknown()]
    assert observer.states == [
        Unknown(),
        Follower(leader_endpoint=A, leader_epoch=state.epoch),
        Unknown(),
    ]
    for node_id in (A, observer.driver.node_id):
        assert events(logs, "postgres_request_failed", node_id=node_id)
        assert events(logs, "postgres_reconnected", node_id=node_id)


@pytest.mark.anyio
async def test_a_quick_database_restart_costs_the_leader_nothing(
    postgres: PostgresServer, election: str
) -> None:
    ttl = 10  # proof window 8 s: the restart and the reconnects fit in it
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(postgres, election, ttl=ttl))
            first = await start(task_group, driver(postgres, election, A, ttl=ttl))
            old = await first.wait_for(is_leader)
            assert isinstance(old, Leader)
            second = await start(task_group, driver(postgres, election, B, ttl=ttl))
            await second.wait_for(follows(A, old.epoch))
            await observer.wait_for(follows(A, old.epoch))

            await anyio.to_thread.run_sync(postgres.restart)
            back = anyio.current_time()
            # The lease lives in the table: the leader renews it on a new connection.
            await poll(lambda: first.driver.proven_until >= back + ttl - first.driver.margin)
            for node in (observer, first, second):
                await poll(
                    lambda node=node: events(
                        logs, "postgres_reconnected", node_id=node.driver.node_id
                    )
                )
            task_group.cancel_scope.cancel()
    following = Follower(leader_endpoint=A, leader_epoch=old.epoch)
    assert first.states == [Unknown(), old, Unknown()]
    assert observer.states == [Unknown(), following, Unknown()]
    assert second.states == [following, Unknown()]


@pytest.mark.anyio
async def test_a_database_down_longer_than_the_lease_elects_anew_at_a_higher_epoch(
    postgres: PostgresServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        observer = await start(task_group, driver(postgres, election))
        first = await start(task_group, driver(postgres, election, A))
        old = await first.wait_for(is_leader)
        assert isinstance(old, Leader)
        second = await start(task_group, driver(postgres, election, B))
        await second.wait_for(follows(A, old.epoch))
        await observer.wait_for(follows(A, old.epoch))

        stopped = await anyio.to_thread.run_sync(lambda: postgres.restart(down_for=TTL + 0.5))
        leader = await converged([first, second], observer)
        task_group.cancel_scope.cancel()
    step_down = next(t for t, state in first.seen if t >= stopped and is_unknown(state))
    assert step_down <= stopped + PROOF + SLACK
    assert leader.epoch > old.epoch
    assert_epochs_never_decrease(first, second, observer)
    assert_one_leader_per_epoch(first, second)


@pytest.mark.anyio
async def test_a_row_gone_back_in_time_gives_unknown_one_error_and_a_higher_epoch_next(
    postgres: PostgresServer, election: str
) -> None:
    # What a failover to a lagging replica looks like from the nodes: the row
    # suddenly shows an older epoch held by someone else.
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(postgres, election, strict=True))
            leader = await start(task_group, driver(postgres, election, A))
            await leader.wait_for(is_leader)
            await leader.exit()
            leader = await start(task_group, driver(postgres, election, A, node_id="a2"))
            state = await leader.wait_for(is_leader)
            assert isinstance(state, Leader)
            assert state.epoch >= 2
            await observer.wait_for(follows(A, state.epoch))

            await execute(
                postgres,
                "UPDATE leaderwatch.elections SET epoch = epoch - 1, holder_endpoint = $2, "
                "holder_node_id = 'ghost', holder_token = gen_random_uuid(), "
                "lease_expires_at = now() + interval '1 second' WHERE election = $1",
                election,
                C,
            )
            for node in (leader, observer):
                await node.wait_for(is_unknown, within=1)
            # Once the old lease expires, the node campaigns above everything it saw.
            new = await leader.wait_for(is_leader, within=3)
            assert new == Leader(epoch=state.epoch + 1)
            await observer.wait_for(follows(A, state.epoch + 1), within=2)

            # Another holder at the very epoch this node led at: the same alarm.
            await execute(
                postgres,
                "UPDATE leaderwatch.elections SET holder_endpoint = $2, holder_token = "
                "gen_random_uuid(), lease_expires_at = now() + interval '1 second' "
                "WHERE election = $1",
                election,
                C,
            )
            for node in (leader, observer):
                await node.wait_for(is_unknown, within=1)
            newer = await leader.wait_for(is_leader, within=3)
            assert newer == Leader(epoch=state.epoch + 2)
            task_group.cancel_scope.cancel()
    behind = events(logs, "postgres_epoch_behind")
    assert {(log["node_id"], log["epoch"], log["reason"]) for log in behind} == {
        ("a2", state.epoch - 1, "below_high_water"),
        (observer.driver.node_id, state.epoch - 1, "below_high_water"),
        ("a2", state.epoch + 1, "other_holder_at_seen_epoch"),
        (observer.driver.node_id, state.epoch + 1, "other_holder_at_seen_epoch"),
    }
    assert len(behind) == 4  # once per node and row, however often it is read
    assert all(log["log_level"] == "error" for log in behind)
    assert not any(
        isinstance(seen, Follower) and seen.leader_endpoint == C for seen in observer.states
    ), observer.states
    assert events(logs, "postgres_tenure_lost", node_id="a2", reason="renewal_refused")
    assert_epochs_never_decrease(leader, observer)


# -- start-up, schema and configuration ---------------------------------------------------


@pytest.mark.anyio
async def test_many_nodes_starting_at_once_create_the_schema_once_and_elect_one_leader(
    postgres: PostgresServer, election: str
) -> None:
    schema = f"race_{uuid.uuid4().hex[:8]}"
    nodes: list[Node] = []
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            drivers = [
                driver(postgres, election, f"10.0.1.{index}:7000", schema=schema)
                for index in range(8)
            ]
            async with anyio.create_task_group() as starting:
                for candidate in drivers:
                    node = Node(candidate)
                    nodes.append(node)
                    starting.start_soon(task_group.start, node.run)
            state = await converged(nodes)
            task_group.cancel_scope.cancel()
    assert state == Leader(epoch=1)
    assert len(events(logs, "postgres_schema_created")) == 1
    async with session(postgres.dsn) as conn:
        count = await conn.fetchval(f"SELECT count(*) FROM {schema}.elections")
        triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass",
            f"{schema}.elections",
        )
    assert (count, triggers) == (1, 1)
    assert_one_leader_per_epoch(*nodes)


@pytest.mark.anyio
async def test_a_role_without_create_is_refused_clearly_and_runs_on_a_table_made_for_it(
    postgres: PostgresServer, election: str
) -> None:
    role = f"node_{uuid.uuid4().hex[:8]}"
    schema = f"granted_{uuid.uuid4().hex[:8]}"
    await execute(postgres, f"CREATE ROLE {role} LOGIN PASSWORD 'secret-pw'")
    dsn = postgres.dsn_for(role, "secret-pw")
    refused = PostgresElectionDriver(dsn, election=election, node_endpoint=A, schema=schema)
    with pytest.raises(PostgresPermissionError) as caught:
        async with refused:
            pass
    message = str(caught.value)
    assert "\n" not in message
    assert "permission denied" in message
    assert "grant" in message
    assert "secret-pw" not in message

    # An operator creates the table with schema_ddl() and grants only what a node needs.
    await execute(postgres, schema_ddl(schema))
    await execute(
        postgres,
        f"GRANT USAGE ON SCHEMA {schema} TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE ON {schema}.elections TO {role}",
    )
    async with anyio.create_task_group() as task_group:
        limited = await start(
            task_group,
            PostgresElectionDriver(dsn, election=election, node_endpoint=A, schema=schema, ttl=TTL),
        )
        state = await limited.wait_for(is_leader)
        observer = await start(task_group, driver(postgres, election, schema=schema))
        await observer.wait_for(follows(A, observed_epoch(state) or 0))
        # The trigger notifies the observer of the hand-over (no poll needed).
        sent = await limited.exit()
        await observer.wait_for(is_unknown, within=RENEW)
        assert observer.seen[-1][0] - sent < RENEW
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_start_up_errors_name_the_problem_in_one_line(postgres: PostgresServer) -> None:
    cases: list[tuple[str, type[Exception], str]] = [
        (postgres.dsn_for("postgres", "wrong-password"), PostgresAuthError, "credentials"),
        (postgres.dsn_for("nobody_here", "x"), PostgresAuthError, "pg_hba"),
        (
            postgres.dsn_for("postgres", postgres.password, "missing_db"),
            PostgresElectionError,
            'database "missing_db" does not exist',
        ),
        (f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", PostgresUnavailable, "reach"),
        (postgres.dsn + "?sslmode=bogus", PostgresDsnError, "sslmode"),
        ("postgresql://postgres@127.0.0.1:port/postgres", PostgresDsnError, "bad DSN"),
        (postgres.dsn + "?sslmode=require", PostgresUnavailable, "SSL"),
    ]
    for dsn, error_type, needle in cases:
        node = PostgresElectionDriver(dsn, election="e", node_endpoint=A, connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(error_type) as caught:
            async with node:
                pass
        message = str(caught.value)
        assert needle in message, message
        assert "\n" not in message
        assert postgres.password not in message
        assert "wrong-password" not in message
        assert "127.0.0.1:" in message
        assert time.monotonic() - started < 3
        assert node.current == Unknown()


@pytest.mark.anyio
async def test_a_frozen_server_fails_start_up_within_connect_timeout(
    postgres: PostgresServer,
) -> None:
    node = PostgresElectionDriver(postgres.dsn, election="e", connect_timeout=0.5)
    postgres.pause()
    try:
        started = time.monotonic()
        with pytest.raises(PostgresUnavailable, match=r"no answer .* within 0\.5s"):
            async with node:
                pass
        assert time.monotonic() - started < 1.5
    finally:
        postgres.resume()


def test_entering_under_trio_raises_a_clear_error(postgres: PostgresServer) -> None:
    async def enter() -> None:
        async with PostgresElectionDriver(postgres.dsn, election="e"):
            pass

    with pytest.raises(PostgresElectionError, match="asyncio backend only"):
        trio.run(enter)


def test_construction_refuses_bad_arguments() -> None:
    dsn = "postgresql://u:pw@127.0.0.1:5432/db"
    with pytest.raises(InvalidEndpoint, match="scheme"):
        PostgresElectionDriver(dsn, election="e", node_endpoint="http://10.0.0.1:80")
    with pytest.raises(PostgresDsnError, match="postgresql://") as caught:
        PostgresElectionDriver("host=127.0.0.1 password=hunter2", election="e")
    assert "hunter2" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError, match="election"):
        PostgresElectionDriver(dsn, election="")
    with pytest.raises(ValueError, match="election"):
        PostgresElectionDriver(dsn, election="a\x00b")
    with pytest.raises(ValueError, match="ttl"):
        PostgresElectionDriver(dsn, election="e", ttl=0)
    with pytest.raises(ValueError, match="margin"):
        PostgresElectionDriver(dsn, election="e", ttl=2, margin=2)
    for schema in ("Leaderwatch", "lw; DROP TABLE x", "1lw", "", "x" * 64):
        with pytest.raises(ValueError, match="schema"):
            PostgresElectionDriver(dsn, election="e", schema=schema)
    with pytest.raises(ValueError, match="connect_timeout"):
        PostgresElectionDriver(dsn, election="e", connect_timeout=0)
    with pytest.raises(ValueError, match="connect_options"):
        PostgresElectionDriver(dsn, election="e", connect_options={"timeout": 1})
    node = PostgresElectionDriver(dsn, election="e", ttl=10)
    assert (node.margin, node.timing.renew_interval, node.table) == (
        2.0,
        8 / 3,
        "leaderwatch.elections",
    )
    assert node.node_id == "postgres-observer:e"
    assert PostgresElectionDriver(dsn, election="e", node_endpoint=A).node_id == A


def test_the_driver_is_loaded_lazily_and_names_its_extra_when_missing() -> None:
    import leaderwatch
    import leaderwatch.drivers

    assert leaderwatch.PostgresElectionDriver is PostgresElectionDriver
    assert leaderwatch.drivers.PostgresElectionDriver is PostgresElectionDriver
    blocked = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['asyncpg'] = None\n"
            "import leaderwatch.drivers\n"
            "leaderwatch.drivers.PostgresElectionDriver",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert blocked.returncode != 0
    assert "pip install 'leaderwatch[postgres]'" in blocked.stderr

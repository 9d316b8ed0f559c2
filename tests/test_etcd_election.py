"""EtcdElectionDriver against a real etcd server, in one process, with etcdctl as the reference.

grpc.aio runs on asyncio only, so these tests run on the asyncio backend;
one test checks that trio gets a clear error.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from aetcd import rpc
from etcd_server import EtcdKey, EtcdServer, etcd_server, free_port

from leaderwatch.drivers.etcd import (
    EtcdAuthError,
    EtcdElectionDriver,
    EtcdElectionError,
    EtcdUnavailable,
)
from leaderwatch.drivers.etcd._client import _writes
from leaderwatch.state import Follower, InvalidEndpoint, Leader, Unknown, observed_epoch
from leaderwatch.testing import capture_events

State = Leader | Follower | Unknown
TTL = 2  # etcd's smallest useful lease; margin defaults to 0.5 s, so the proof lasts 1.5 s
MARGIN = 0.5
PROOF = TTL - MARGIN
SLACK = 0.25  # event-loop wake-up and scheduling on a loaded 2-core runner
assert SLACK < MARGIN  # else "stepped down before the lease could expire" would prove nothing
A, B, C = "10.0.0.1:7001", "10.0.0.2:7002", "10.0.0.3:7003"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_per_module() -> None:
    """Run every test of this module in one event loop.

    grpc.aio keeps process-wide state bound to the loop it first ran on;
    completions of calls from an earlier test's (closed) loop otherwise
    surface as "Event loop is closed" errors in a later test. A module-scoped
    async fixture keeps anyio's runner, hence its loop, for the whole module.
    """


@pytest.fixture
def election() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def driver(
    etcd: EtcdServer, election: str, endpoint: str | None = None, **options: Any
) -> EtcdElectionDriver:
    options.setdefault("ttl", TTL)
    return EtcdElectionDriver(etcd.endpoint, election=election, node_endpoint=endpoint, **options)


class Node:
    """A driver running in its own task, with every value it published and when."""

    def __init__(self, driver: EtcdElectionDriver) -> None:
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


async def start(task_group: anyio.abc.TaskGroup, driver: EtcdElectionDriver) -> Node:
    node = Node(driver)
    await task_group.start(node.run)
    return node


def is_leader(state: State) -> bool:
    return isinstance(state, Leader)


def follows(endpoint: str | None, epoch: int) -> Callable[[State], bool]:
    return lambda state: state == Follower(leader_endpoint=endpoint, leader_epoch=epoch)


async def keys(etcd: EtcdServer, election: str) -> list[EtcdKey]:
    return await anyio.to_thread.run_sync(etcd.keys, election + "/")


async def etcdctl(etcd: EtcdServer, *args: str, stdin: str | None = None) -> str:
    done = await anyio.to_thread.run_sync(lambda: etcd.etcdctl(*args, stdin=stdin))
    return done.stdout


class Ctl:
    """A long-running etcdctl process (``elect``), its output lines collected by a thread."""

    def __init__(self, etcd: EtcdServer, *args: str) -> None:
        self.process = subprocess.Popen(
            etcd.etcdctl_argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    async def wait_line(self, line: str, within: float = 10.0) -> None:
        with anyio.fail_after(within):
            while line not in self.lines:
                assert self.process.poll() is None, f"etcdctl exited: {self.lines}"
                await anyio.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (etcdctl resigns), SIGKILL if it lingers; blocks, so call it from a thread."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    async def astop(self) -> None:
        await anyio.to_thread.run_sync(self.stop)


@pytest.fixture
def ctl(etcd: EtcdServer) -> Iterator[Callable[..., Ctl]]:
    with contextlib.ExitStack() as stack:

        def spawn(*args: str) -> Ctl:
            process = Ctl(etcd, *args)
            stack.callback(process.stop)
            return process

        yield spawn


class Relay:
    """A loopback TCP relay to an etcd server that can freeze and be pointed at another server.

    Frozen, it holds every byte in both directions (a hung etcd, seen from the
    client); :meth:`retarget` drops every connection and sends new ones to
    another port.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._thawed = anyio.Event()
        self._thawed.set()
        self._connections: set[anyio.CancelScope] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._relay)

    def freeze(self) -> float:
        """Stop forwarding; return the time just before."""
        self._thawed = anyio.Event()
        return anyio.current_time()

    def retarget(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        for scope in self._connections:
            scope.cancel()

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with (
                    client,
                    await anyio.connect_tcp("127.0.0.1", self.upstream_port) as up,
                    anyio.create_task_group() as pumps,
                ):
                    pumps.start_soon(self._pump, client, up, pumps.cancel_scope)
                    pumps.start_soon(self._pump, up, client, pumps.cancel_scope)
            except OSError:
                pass
            finally:
                self._connections.discard(scope)

    async def _pump(
        self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, both: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await self._thawed.wait()
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        both.cancel()


async def poll(condition: Callable[[], object], within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


async def wait_keys(
    etcd: EtcdServer, election: str, predicate: Callable[[list[EtcdKey]], bool]
) -> list[EtcdKey]:
    with anyio.fail_after(10):
        while True:
            found = await keys(etcd, election)
            if predicate(found):
                return found
            await anyio.sleep(0.02)


async def converged(candidates: list[Node], observer: Node) -> Leader:
    """Wait until one candidate leads and every other node follows it; return its state."""
    with anyio.fail_after(10):
        while True:
            leaders = [node for node in candidates if is_leader(node.state)]
            if len(leaders) == 1:
                state = leaders[0].state
                assert isinstance(state, Leader)
                expected = Follower(
                    leader_endpoint=leaders[0].driver.node_endpoint, leader_epoch=state.epoch
                )
                others = [node for node in [*candidates, observer] if node is not leaders[0]]
                if all(node.state == expected for node in others):
                    return state
            await anyio.sleep(0.01)


def assert_epochs_never_decrease(*nodes: Node) -> None:
    for node in nodes:
        epochs = [epoch for state in node.states if (epoch := observed_epoch(state)) is not None]
        assert epochs == sorted(epochs), node.states


def assert_one_leader_per_epoch(*nodes: Node) -> None:
    owners: dict[int, int] = {}
    for index, node in enumerate(nodes):
        for state in node.states:
            if isinstance(state, Leader):
                assert owners.setdefault(state.epoch, index) == index, "two leaders at one epoch"


# -- the key layout and hand-over ----------------------------------------------------


@pytest.mark.anyio
async def test_candidates_use_the_election_recipe_layout_and_hand_over_on_exit(
    etcd: EtcdServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        first = await start(task_group, driver(etcd, election, A, ttl=10))
        await first.wait_for(is_leader)
        second = await start(task_group, driver(etcd, election, B, ttl=10))
        found = await wait_keys(etcd, election, lambda found: len(found) == 2)
        for key, node, endpoint in zip(found, (first, second), (A, B), strict=True):
            assert key.key == f"{election}/{key.lease:x}"
            assert key.lease == node.driver.lease_id
            assert key.value == endpoint
            assert key.create_revision == node.driver.campaign_revision
        assert first.state == Leader(epoch=found[0].create_revision)
        await second.wait_for(follows(A, found[0].create_revision))

        # The lease is revoked on exit: the successor takes over long before ttl=10 s.
        await first.exit()
        state = await second.wait_for(is_leader, within=3)
        assert state == Leader(epoch=found[1].create_revision)
        assert [key.key for key in await keys(etcd, election)] == [found[1].key]
        task_group.cancel_scope.cancel()
    assert first.states == [Unknown(), Leader(epoch=found[0].create_revision), Unknown()]
    assert second.states[-2:] == [Leader(epoch=found[1].create_revision), Unknown()]
    assert await keys(etcd, election) == []


@pytest.mark.anyio
async def test_resign_hands_over_at_once_never_campaigns_again_and_keeps_observing(
    etcd: EtcdServer, election: str
) -> None:
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            first = await start(task_group, driver(etcd, election, A, ttl=10))
            old = await first.wait_for(is_leader)
            assert isinstance(old, Leader)
            second = await start(task_group, driver(etcd, election, B, ttl=10))
            _, theirs = await wait_keys(etcd, election, lambda found: len(found) == 2)
            await second.wait_for(follows(A, old.epoch))
            lease = first.driver.lease_id
            assert lease is not None

            resigned_at = anyio.current_time()
            since = len(logs)
            await first.driver.resign()
            assert not is_leader(first.driver.current)
            assert first.driver.proven_until == -math.inf
            assert (first.driver.lease_id, first.driver.campaign_revision) == (None, None)
            assert not first.driver.campaigning
            # Its key and its lease are gone from etcd.
            assert [key.key for key in await keys(etcd, election)] == [theirs.key]
            assert f"{lease:x}" not in await etcdctl(etcd, "lease", "list")
            # ttl=10: the successor leads because of the resignation, not a lease expiry.
            assert await second.wait_for(is_leader, within=3) == Leader(
                epoch=theirs.create_revision
            )
            # The resigned node keeps observing and follows its successor.
            await first.wait_for(follows(B, theirs.create_revision))
            await first.driver.resign()  # idempotent

            # It never campaigns again: once the successor leaves there is no
            # leader, and a newcomer takes over while it only follows.
            await second.exit()
            await first.wait_for(lambda state: state == Unknown(), within=3)
            third = await start(task_group, driver(etcd, election, C, ttl=10))
            new = await third.wait_for(is_leader)
            assert isinstance(new, Leader)
            await first.wait_for(follows(C, new.epoch))
            assert [key.value for key in await keys(etcd, election)] == [C]
            task_group.cancel_scope.cancel()
    assert not any(is_leader(state) for t, state in first.seen if t >= resigned_at), first.seen
    assert_epochs_never_decrease(first, second, third)
    assert_one_leader_per_epoch(first, second, third)
    after = [log for log in logs[since:] if log.get("node_id") == A]
    assert not [log for log in after if log["event"] == "etcd_lease_granted"], after
    assert not [log for log in after if log["event"] == "etcd_campaign_abandoned"], after
    assert {"event": "etcd_lease_revoked", "lease_id": f"{lease:x}"}.items() <= next(
        log for log in after if log["event"] == "etcd_lease_revoked"
    ).items()


@pytest.mark.anyio
async def test_observer_sees_unknown_without_candidates_and_follows_a_leader(
    etcd: EtcdServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        observer = await start(task_group, driver(etcd, election))
        candidate = await start(task_group, driver(etcd, election, A))
        leader = await candidate.wait_for(is_leader)
        assert isinstance(leader, Leader)
        await observer.wait_for(follows(A, leader.epoch))
        await candidate.exit()
        await observer.wait_for(lambda state: state == Unknown(), within=3)
        task_group.cancel_scope.cancel()
    assert observer.states[-2:] == [
        Follower(leader_endpoint=A, leader_epoch=leader.epoch),
        Unknown(),
    ]


@pytest.mark.anyio
async def test_a_leader_value_that_is_not_an_endpoint_gives_follower_none_and_an_error(
    etcd: EtcdServer, election: str
) -> None:
    lease = (await etcdctl(etcd, "lease", "grant", "30")).split()[1]
    key = f"{election}/{lease}"
    await etcdctl(etcd, "put", f"--lease={lease}", key, "http://10.0.0.9:80")
    (found,) = await keys(etcd, election)
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(etcd, election))
            await observer.wait_for(follows(None, found.create_revision))
            task_group.cancel_scope.cancel()
    await etcdctl(etcd, "lease", "revoke", lease)
    errors = [log for log in logs if log["event"] == "etcd_leader_endpoint_invalid"]
    assert len(errors) == 1
    assert errors[0]["log_level"] == "error"
    assert errors[0]["key"] == key
    assert errors[0]["value"] == "http://10.0.0.9:80"
    assert "scheme" in errors[0]["reason"]


# -- interoperability with etcdctl elect ----------------------------------------------


@pytest.mark.anyio
async def test_an_etcdctl_leader_is_followed_and_its_resignation_elects_us(
    etcd: EtcdServer, election: str, ctl: Callable[..., Ctl]
) -> None:
    reference = ctl("elect", election, C)
    await reference.wait_line(C)
    (theirs,) = await keys(etcd, election)
    assert theirs.key == f"{election}/{theirs.lease:x}"
    async with anyio.create_task_group() as task_group:
        observer = await start(task_group, driver(etcd, election))
        candidate = await start(task_group, driver(etcd, election, A))
        await candidate.wait_for(follows(C, theirs.create_revision))
        await observer.wait_for(follows(C, theirs.create_revision))

        await reference.astop()  # SIGTERM: etcdctl resigns
        state = await candidate.wait_for(is_leader, within=3)
        assert isinstance(state, Leader)
        assert state.epoch > theirs.create_revision
        assert state.epoch == candidate.driver.campaign_revision
        await observer.wait_for(follows(A, state.epoch))
        task_group.cancel_scope.cancel()
    assert_epochs_never_decrease(observer, candidate)


@pytest.mark.anyio
async def test_etcdctl_sees_our_leader_and_takes_over_when_it_resigns(
    etcd: EtcdServer, election: str, ctl: Callable[..., Ctl]
) -> None:
    async with anyio.create_task_group() as task_group:
        observer = await start(task_group, driver(etcd, election))
        ours = await start(task_group, driver(etcd, election, A, ttl=10))
        leader = await ours.wait_for(is_leader)
        assert isinstance(leader, Leader)
        listing = ctl("elect", "-l", election)
        await listing.wait_line(A)
        waiting = ctl("elect", election, C)
        await wait_keys(etcd, election, lambda found: len(found) == 2)

        await ours.exit()
        await waiting.wait_line(C, within=3)
        await listing.wait_line(C)
        (theirs,) = await keys(etcd, election)
        assert theirs.create_revision > leader.epoch
        await observer.wait_for(follows(C, theirs.create_revision))
        task_group.cancel_scope.cancel()


# -- lease safety ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_frozen_etcd_makes_the_leader_step_down_before_its_lease_can_expire(
    etcd: EtcdServer, election: str
) -> None:
    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            observer = await start(task_group, driver(etcd, election))
            first = await start(task_group, driver(etcd, election, A))
            old = await first.wait_for(is_leader)
            assert isinstance(old, Leader)
            second = await start(task_group, driver(etcd, election, B))
            await second.wait_for(follows(A, old.epoch))
            await observer.wait_for(follows(A, old.epoch))

            paused = etcd.pause()
            try:
                for node in (first, second, observer):
                    await node.wait_for(lambda state: state == Unknown(), within=PROOF + 1)
                # Keep etcd frozen past the lease's server-side expiry.
                await anyio.sleep_until(paused + TTL + 0.3)
            finally:
                resumed = etcd.resume()
            leader = await converged([first, second], observer)
            task_group.cancel_scope.cancel()

    abandoned = [
        log
        for log in logs
        if log["event"] == "etcd_campaign_abandoned" and log["reason"] == "lease_unproven"
    ]
    leader_log = next(log for log in abandoned if log["node_id"] == A and log["was_leader"])
    assert leader_log["proven_until"] - leader_log["last_acked_send"] == pytest.approx(PROOF)
    assert leader_log["last_acked_send"] <= paused
    step_down = next(t for t, state in first.seen if t >= paused and state == Unknown())
    # No later than ttl - margin after the last acknowledged keep-alive was sent,
    # hence before etcd (which received it later) could expire the lease.
    assert step_down <= leader_log["proven_until"] + SLACK
    assert step_down < leader_log["last_acked_send"] + TTL
    unseen = next(t for t, state in observer.seen if t >= paused and state == Unknown())
    assert unseen <= paused + PROOF + SLACK
    for node in (first, second, observer):
        assert not any(
            is_leader(state) for t, state in node.seen if paused + PROOF + SLACK < t < resumed
        ), node.seen
    # The observer lost contact once and got it back once.
    observer_id = observer.driver.node_id
    assert [log["event"] for log in logs if log.get("node_id") == observer_id].count(
        "etcd_reconnected"
    ) == 1
    assert observer.driver.reconnects == 1
    # After etcd resumes, one fresh campaign leads at a higher epoch.
    assert leader.epoch > old.epoch
    assert_epochs_never_decrease(first, second, observer)
    assert_one_leader_per_epoch(first, second)


@pytest.mark.anyio
async def test_a_revoked_lease_or_deleted_key_ends_the_campaign_and_a_fresh_one_leads(
    etcd: EtcdServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        node = await start(task_group, driver(etcd, election, A, ttl=10))
        first = await node.wait_for(is_leader)
        assert isinstance(first, Leader)
        first_lease = node.driver.lease_id
        assert first_lease is not None

        await etcdctl(etcd, "lease", "revoke", f"{first_lease:x}")
        second = await node.wait_for(lambda state: is_leader(state) and state != first, within=5)
        assert isinstance(second, Leader)
        assert second.epoch > first.epoch
        assert node.driver.lease_id not in (None, first_lease)

        (key,) = await keys(etcd, election)
        await etcdctl(etcd, "del", key.key)
        third = await node.wait_for(lambda state: is_leader(state) and state != second, within=5)
        assert isinstance(third, Leader)
        assert third.epoch > second.epoch
        task_group.cancel_scope.cancel()
    # Each lost campaign was published as a step-down before the next Leader.
    leads = [index for index, state in enumerate(node.states) if is_leader(state)]
    assert len(leads) == 3
    assert all(node.states[index + 1] == Unknown() for index in leads)
    assert len(await keys(etcd, election)) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("together", [False, True], ids=["one_then_other", "one_revision"])
async def test_a_candidate_whose_own_key_goes_with_its_predecessor_never_leads(
    etcd: EtcdServer, election: str, together: bool
) -> None:
    # P (etcdctl's key) < C < D. C's key is deleted while C waits on P (its
    # lease lives on), before P or in the same revision as P; C must see that
    # its own key is gone and not lead beside D, the real successor.
    lease = (await etcdctl(etcd, "lease", "grant", "60")).split()[1]
    await etcdctl(etcd, "put", f"--lease={lease}", f"{election}/{lease}", C)
    (p_key,) = await keys(etcd, election)
    async with anyio.create_task_group() as task_group:
        c = await start(task_group, driver(etcd, election, A, ttl=10))
        await c.wait_for(follows(C, p_key.create_revision))
        # C's key exists before D campaigns, so the line is P < C < D.
        await wait_keys(etcd, election, lambda found: len(found) == 2)
        d = await start(task_group, driver(etcd, election, B, ttl=10))
        await d.wait_for(follows(C, p_key.create_revision))
        found = await wait_keys(etcd, election, lambda found: len(found) == 3)
        assert [key.value for key in found] == [C, A, B]
        # C's campaign checked its key and now watches P: the case under test.
        await poll(lambda: c.driver._campaign is not None and c.driver._campaign.waiting_on)

        if together:
            await etcdctl(etcd, "txn", stdin=f"\ndel {found[1].key}\ndel {p_key.key}\n\n\n")
        else:
            await etcdctl(etcd, "del", found[1].key)
        await etcdctl(etcd, "lease", "revoke", lease)
        state = await d.wait_for(is_leader)
        assert state == Leader(epoch=found[2].create_revision)
        # C starts a fresh campaign behind D.
        await c.wait_for(follows(B, found[2].create_revision))
        task_group.cancel_scope.cancel()
    assert not any(is_leader(state) for state in c.states), c.states
    assert_epochs_never_decrease(c, d)


@pytest.mark.anyio
async def test_a_frozen_endpoint_is_left_for_the_next_and_every_loop_survives_the_switch(
    etcd: EtcdServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        relay = Relay(etcd.port)
        await task_group.start(relay.serve)
        leader = await start(task_group, driver(etcd, election, A, ttl=10))
        state = await leader.wait_for(is_leader)
        assert isinstance(state, Leader)
        via_relay = f"{relay.endpoint},{etcd.endpoint}"
        observer = await start(
            task_group, EtcdElectionDriver(via_relay, election=election, ttl=TTL)
        )
        candidate = await start(
            task_group, EtcdElectionDriver(via_relay, election=election, node_endpoint=B, ttl=TTL)
        )
        for node in (observer, candidate):
            await node.wait_for(follows(A, state.epoch))
            assert node.driver.etcd_endpoint == relay.endpoint

        # Calls in flight on the frozen endpoint end when the driver closes its
        # channel; the loops that made them must retry on the next endpoint.
        relay.freeze()
        for node in (observer, candidate):
            await node.wait_for(lambda state: state == Unknown(), within=PROOF + 2)
        for node in (observer, candidate):
            await node.wait_for(follows(A, state.epoch), within=10)
            assert node.driver.etcd_endpoint == etcd.endpoint
        # The candidate campaigns again through the new endpoint.
        await wait_keys(etcd, election, lambda found: [key.value for key in found] == [A, B])
        await leader.exit()
        assert await candidate.wait_for(is_leader) == Leader(
            epoch=candidate.driver.campaign_revision
        )
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_leader_below_a_published_epoch_gives_unknown_and_one_error_log(
    etcd: EtcdServer, election: str
) -> None:
    # The relay first leads to the shared server, then to a fresh one whose
    # revisions are lower: etcd as if restored from an older snapshot.
    with contextlib.ExitStack() as stack:
        older = await anyio.to_thread.run_sync(stack.enter_context, etcd_server())
        old_lease = (await etcdctl(older, "lease", "grant", "60")).split()[1]
        await etcdctl(older, "put", f"--lease={old_lease}", f"{election}/{old_lease}", B)
        (behind,) = await keys(older, election)
        await etcdctl(etcd, "put", f"{election}-pad", "x")  # its revision exceeds older's
        await etcdctl(etcd, "del", f"{election}-pad")
        with capture_events() as logs:
            async with anyio.create_task_group() as task_group:
                relay = Relay(etcd.port)
                await task_group.start(relay.serve)
                leader = await start(task_group, driver(etcd, election, A, ttl=10))
                state = await leader.wait_for(is_leader)
                assert isinstance(state, Leader)
                assert state.epoch > behind.create_revision
                observer = await start(
                    task_group, EtcdElectionDriver(relay.endpoint, election=election, ttl=TTL)
                )
                await observer.wait_for(follows(A, state.epoch))

                relay.retarget(older.port)
                await observer.wait_for(lambda state: state == Unknown(), within=PROOF + 2)
                # A change of the stale leader key makes the observer read it again.
                await etcdctl(older, "put", f"--lease={old_lease}", behind.key, "http://x:1")
                await poll(
                    lambda: any(log["event"] == "etcd_leader_endpoint_invalid" for log in logs)
                )
                assert observer.state == Unknown()
                task_group.cancel_scope.cancel()
        await anyio.to_thread.run_sync(stack.close)
    behind_logs = [log for log in logs if log["event"] == "etcd_epoch_behind"]
    assert len(behind_logs) == 1, behind_logs
    assert behind_logs[0]["log_level"] == "error"
    assert behind_logs[0]["node_id"] == observer.driver.node_id
    assert behind_logs[0]["key"] == behind.key
    assert behind_logs[0]["create_revision"] == behind.create_revision
    assert behind_logs[0]["high_water"] == state.epoch
    assert Follower(leader_endpoint=B, leader_epoch=behind.create_revision) not in observer.states


# -- start-up errors and configuration ------------------------------------------------


@pytest.mark.anyio
async def test_the_first_value_after_start_up_is_what_etcd_holds(
    etcd: EtcdServer, election: str
) -> None:
    async with anyio.create_task_group() as task_group:
        async with driver(etcd, election) as observer:
            assert observer.current == Unknown()  # no candidate yet
        leader = await start(task_group, driver(etcd, election, A, ttl=10))
        state = await leader.wait_for(is_leader)
        assert isinstance(state, Leader)
        expected = Follower(leader_endpoint=A, leader_epoch=state.epoch)
        async with driver(etcd, election) as observer:
            assert observer.current == expected
        async with driver(etcd, election, B) as candidate:
            assert candidate.current == expected
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_unreachable_endpoint_fails_start_up_naming_it() -> None:
    dead = f"127.0.0.1:{free_port()}"
    node = EtcdElectionDriver(dead, election="e", node_endpoint=A, connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable, match=dead):
        async with node:
            pass
    assert time.monotonic() - started < 3
    assert node.current == Unknown()


@pytest.mark.anyio
async def test_tls_against_a_plaintext_server_fails_start_up_with_a_tls_hint(
    etcd: EtcdServer,
) -> None:
    node = EtcdElectionDriver(etcd.endpoint, election="e", tls=True, connect_timeout=1)
    with pytest.raises(EtcdUnavailable, match=r"(?s)" + etcd.endpoint + ".*TLS"):
        async with node:
            pass


@pytest.mark.anyio
async def test_the_first_endpoint_that_answers_is_used(etcd: EtcdServer, election: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    node = EtcdElectionDriver(
        f"{dead},{etcd.endpoint}", election=election, node_endpoint=A, connect_timeout=1, ttl=TTL
    )
    async with anyio.create_task_group() as task_group:
        running = await start(task_group, node)
        await running.wait_for(is_leader)
        assert node.etcd_endpoint == etcd.endpoint
        task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_authentication_is_used_and_refusals_are_clear() -> None:
    with etcd_server() as secured:
        secured.etcdctl("user", "add", "root", "--new-user-password=s3cret")
        secured.etcdctl("auth", "enable")
        for options, pattern in (
            ({}, "unauthenticated client"),
            ({"username": "root", "password": "wrong"}, "user 'root'"),
        ):
            node = EtcdElectionDriver(
                secured.endpoint, election="e", node_endpoint=A, connect_timeout=2, **options
            )
            with pytest.raises(EtcdAuthError, match=pattern) as refused:
                async with node:
                    pass
            assert secured.endpoint in str(refused.value)
        node = EtcdElectionDriver(
            secured.endpoint,
            election="e",
            node_endpoint=A,
            ttl=TTL,
            username="root",
            password="s3cret",
        )
        async with anyio.create_task_group() as task_group:
            running = await start(task_group, node)
            await running.wait_for(is_leader)
            task_group.cancel_scope.cancel()


@pytest.mark.anyio
async def test_read_only_transactions_are_never_sent() -> None:
    # etcd before 3.5.5 panics when a read-only transaction is cancelled mid-way (etcd
    # issue 14110; it took the suite's etcd down once): reads go through range().
    client = EtcdElectionDriver("127.0.0.1:2379", election="e")._client
    key = b"e/1"
    read = rpc.RequestOp(request_range=rpc.RangeRequest(key=key))
    put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=b"v"))
    delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
    for request in (rpc.TxnRequest(success=[read]), rpc.TxnRequest(success=[read], failure=[read])):
        with pytest.raises(ValueError, match="14110"):
            await client.txn(request)
    assert all(
        _writes(request)
        for request in (
            rpc.TxnRequest(success=[put], failure=[read]),
            rpc.TxnRequest(success=[read], failure=[delete]),
        )
    )


def test_construction_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidEndpoint, match="scheme"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", node_endpoint="http://10.0.0.1:80")
    with pytest.raises(InvalidEndpoint, match=r"etcd endpoint 'http://127\.0\.0\.1:2379'"):
        EtcdElectionDriver("http://127.0.0.1:2379", election="e")
    with pytest.raises(ValueError, match="election"):
        EtcdElectionDriver("127.0.0.1:2379", election="")
    with pytest.raises(ValueError, match="ttl"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", ttl=0)
    with pytest.raises(ValueError, match="margin"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", ttl=2, margin=2)
    with pytest.raises(ValueError, match="together"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", username="root")
    with pytest.raises(ValueError, match="together"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", client_cert=tmp_path / "c.pem")
    with pytest.raises(EtcdElectionError, match="ca_cert"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", ca_cert=tmp_path / "missing.pem")
    not_pem = tmp_path / "hostname"
    not_pem.write_text("node-1\n")
    certificate = tmp_path / "cert.pem"
    certificate.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(EtcdElectionError, match=r"ca_cert .*hostname' does not hold a PEM cert"):
        EtcdElectionDriver("127.0.0.1:2379", election="e", ca_cert=not_pem)
    with pytest.raises(EtcdElectionError, match=r"client_key .* does not hold a PEM private key"):
        EtcdElectionDriver(
            "127.0.0.1:2379", election="e", client_cert=certificate, client_key=certificate
        )
    assert EtcdElectionDriver("127.0.0.1:2379", election="e", ttl=10).margin == 2.0
    assert EtcdElectionDriver("127.0.0.1:2379", election="e", ttl=2).margin == 0.5

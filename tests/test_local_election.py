"""LocalElectionDriver: file-lock election in one process and across processes."""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from nodes import (
    NodeProcess,
    NodeSet,
    assert_epochs_never_decrease,
    assert_history_ok,
    assert_one_leader_per_epoch,
    local_url,
)

from leaderwatch.channel import WatchReceiver
from leaderwatch.drivers import (
    ElectionStateCorrupt,
    LocalElectionDriver,
    LocalElectionError,
)
from leaderwatch.drivers import _local_store as store
from leaderwatch.drivers._local_store import LocalEpochCounter, LocalLeaderRecord
from leaderwatch.drivers.local import EPOCH_FILE, LOCK_FILE, RECORD_FILE
from leaderwatch.state import Follower, InvalidEndpoint, Leader, Unknown
from leaderwatch.testing import capture_events

State = Leader | Follower | Unknown
POLL = 0.01
A, B, C = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"


def driver(directory: Path, endpoint: str) -> LocalElectionDriver:
    return LocalElectionDriver(directory, node_endpoint=endpoint, poll_interval=POLL)


async def wait_state(
    node: LocalElectionDriver, predicate: Callable[[State], bool], within: float = 5
) -> State:
    with anyio.fail_after(within):
        return await node.leadership().wait_for(predicate)


async def collect(receiver: WatchReceiver[State], into: list[State]) -> None:
    async for state in receiver:
        into.append(state)


def is_leader(state: State) -> bool:
    return isinstance(state, Leader)


class HeldLock:
    """The test itself holding a file's lock: by default the election lock, as a leader
    that wrote nothing yet; on ``leader.json``, as the live writer of that record."""

    def __init__(self, directory: Path, name: str = LOCK_FILE) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(directory / name, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[HeldLock]:
    lock = HeldLock(tmp_path)
    yield lock
    lock.release()


def lock_is_free(directory: Path, name: str = LOCK_FILE) -> bool:
    fd = os.open(directory / name, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def live_record(directory: Path, epoch: int, endpoint: str) -> HeldLock:
    """Write a record and hold it as its (live) leader does; release() is that leader dying."""
    (directory / RECORD_FILE).write_text(
        LocalLeaderRecord(
            epoch=epoch, leader_endpoint=endpoint, node_id="test", pid=os.getpid()
        ).model_dump_json()
    )
    return HeldLock(directory, RECORD_FILE)


def replace_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically, so that no poll reads it half-written."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text)
    temp.replace(path)


async def eventually(condition: Callable[[], bool], within: float = 5) -> None:
    """Return once ``condition()`` holds; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        # Files and counters offer no event to wait on: poll.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(POLL)


async def polls(node: LocalElectionDriver, count: int) -> None:
    """Wait until ``node`` re-published an unchanged value ``count`` more times (one per poll)."""
    target = node.stats.suppressed + count
    await eventually(lambda: node.stats.suppressed >= target)


# --- in one process -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_same_directory_elects_one_leader_the_other_follows_it(tmp_path: Path) -> None:
    async with driver(tmp_path, A) as first, driver(tmp_path, B) as second:
        # The first probe ran on enter: no waiting for the first real value.
        assert first.current == Leader(epoch=1)
        assert second.current == Follower(leader_endpoint=A, leader_epoch=1)
        assert first.is_leader
        assert not second.is_leader
    record = LocalLeaderRecord.model_validate_json((tmp_path / RECORD_FILE).read_bytes())
    assert (record.epoch, record.leader_endpoint, record.pid) == (1, A, os.getpid())


@pytest.mark.anyio
async def test_different_directories_each_elect_their_own_leader(tmp_path: Path) -> None:
    async with driver(tmp_path / "x", A) as first, driver(tmp_path / "y", B) as second:
        assert first.current == Leader(epoch=1)
        assert second.current == Leader(epoch=1)


async def run_node(
    directory: Path,
    endpoint: str,
    stop: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[LocalElectionDriver] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with driver(directory, endpoint) as node:
        task_status.started(node)
        await stop.wait()


@pytest.mark.anyio
async def test_graceful_exit_of_the_leader_hands_over(tmp_path: Path) -> None:
    stop = anyio.Event()
    follower_seen: list[State] = []
    leader_seen: list[State] = []
    async with anyio.create_task_group() as task_group:
        leader = await task_group.start(run_node, tmp_path, A, stop)
        task_group.start_soon(collect, leader.leadership(), leader_seen)
        async with driver(tmp_path, B) as follower:
            task_group.start_soon(collect, follower.leadership(), follower_seen)
            await anyio.wait_all_tasks_blocked()
            stop.set()
            assert await wait_state(follower, is_leader) == Leader(epoch=2)
    assert leader_seen == [Leader(epoch=1), Unknown()]
    assert follower_seen == [
        Follower(leader_endpoint=A, leader_epoch=1),
        Leader(epoch=2),
        Unknown(),
    ]


@pytest.mark.anyio
async def test_restart_keeps_epochs_increasing(tmp_path: Path) -> None:
    epochs = []
    for endpoint in (A, A, B, A):
        async with driver(tmp_path, endpoint) as node:
            state = node.current
            assert isinstance(state, Leader)
            epochs.append(state.epoch)
    assert epochs == [1, 2, 3, 4]
    (tmp_path / EPOCH_FILE).unlink()  # the record alone still proves epoch 4 was used
    async with driver(tmp_path, B) as node:
        assert node.current == Leader(epoch=5)
    (tmp_path / RECORD_FILE).unlink()  # and so does the counter alone
    async with driver(tmp_path, B) as node:
        assert node.current == Leader(epoch=6)


@pytest.mark.anyio
async def test_corrupt_record_makes_followers_unknown_without_crashing(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    record = tmp_path / RECORD_FILE
    record.write_text('{"epoch": 4, "leader_endpoint": "10.0.0')
    writer = HeldLock(tmp_path, RECORD_FILE)  # the live leader's hold; write_text keeps the inode
    (tmp_path / EPOCH_FILE).write_text('{"epoch": 4}')
    with capture_events() as logs:
        async with driver(tmp_path, B) as follower:
            assert follower.current == Unknown()
            corrupt = [e for e in logs if e["event"] == "local_election_record_corrupt"]
            assert len(corrupt) == 1
            assert corrupt[0]["log_level"] == "error"
            assert corrupt[0]["path"] == str(record)
            assert "LocalLeaderRecord" in corrupt[0]["reason"]

            record.write_text(
                LocalLeaderRecord(
                    epoch=4, leader_endpoint="10.0.0.9:9000", node_id="x", pid=1
                ).model_dump_json()
            )
            state = await wait_state(follower, lambda s: isinstance(s, Follower))
            assert state == Follower(leader_endpoint="10.0.0.9:9000", leader_epoch=4)

            record.write_bytes(b"")  # truncated
            await wait_state(follower, lambda s: s == Unknown())
            assert any("empty" in e.get("reason", "") for e in logs)

            record.write_text("garbage")
            writer.release()
            held_lock.release()  # the leader died leaving a corrupt record behind
            # The counter still proves epoch 4 was used: the new leader goes above it.
            assert await wait_state(follower, is_leader) == Leader(epoch=5)
    restored = LocalLeaderRecord.model_validate_json(record.read_bytes())
    assert (restored.epoch, restored.leader_endpoint) == (5, B)


@pytest.mark.anyio
async def test_new_leader_refuses_when_no_epoch_source_is_readable(tmp_path: Path) -> None:
    (tmp_path / RECORD_FILE).write_text("{not json")
    (tmp_path / EPOCH_FILE).write_text('{"epoch": -3}')
    node = driver(tmp_path, A)
    with (
        capture_events() as logs,
        pytest.raises(ElectionStateCorrupt, match="both unreadable"),
    ):
        async with node:
            pass
    assert node.current == Unknown()
    assert "local_election_state_corrupt" in [e["event"] for e in logs]
    assert lock_is_free(tmp_path)


@pytest.mark.anyio
async def test_corrupt_state_found_later_cancels_the_body_and_is_raised(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    (tmp_path / RECORD_FILE).write_text("[]")
    (tmp_path / EPOCH_FILE).write_text("")
    body_cancelled = False

    async def run() -> None:
        nonlocal body_cancelled
        async with driver(tmp_path, A) as node:
            assert node.current == Unknown()
            held_lock.release()
            try:
                await anyio.sleep_forever()
            finally:
                body_cancelled = True

    with anyio.fail_after(5), pytest.raises(ElectionStateCorrupt):
        await run()
    assert body_cancelled
    assert lock_is_free(tmp_path)


@pytest.mark.anyio
async def test_follower_never_reports_a_record_naming_itself(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    writer = live_record(tmp_path, 3, B)
    try:
        async with driver(tmp_path, B) as node, driver(tmp_path, A) as other:
            assert node.current == Unknown()
            assert other.current == Follower(leader_endpoint=B, leader_epoch=3)
    finally:
        writer.release()


@pytest.mark.anyio
async def test_followers_drop_a_record_whose_leader_is_gone(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    # held_lock: a successor took the lock but has not written its record yet.
    writer = live_record(tmp_path, 3, A)
    try:
        async with driver(tmp_path, B) as follower:
            assert follower.current == Follower(leader_endpoint=A, leader_epoch=3)
            writer.release()  # the leader that wrote the record exits or dies
            await wait_state(follower, lambda s: s == Unknown())
            writer = live_record(tmp_path, 4, C)  # the successor writes its record
            state = await wait_state(follower, lambda s: isinstance(s, Follower))
            assert state == Follower(leader_endpoint=C, leader_epoch=4)
    finally:
        writer.release()


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.anyio
async def test_a_record_behind_this_nodes_epochs_is_unknown_and_logged_once(
    tmp_path: Path, held_lock: HeldLock, strict: bool
) -> None:
    writer = live_record(tmp_path, 5, A)
    node = LocalElectionDriver(tmp_path, node_endpoint=B, poll_interval=POLL, strict=strict)
    try:
        with capture_events() as logs:
            async with node:
                assert node.current == Follower(leader_endpoint=A, leader_epoch=5)
                writer.release()
                # The directory was wiped or restored, and a leader started over at epoch 1.
                writer = live_record(tmp_path, 1, C)
                await wait_state(node, lambda s: s == Unknown())
                await polls(node, 10)
                assert node.current == Unknown()
                assert node.stats.regressions == 0
    finally:
        writer.release()
    behind = [e for e in logs if e["event"] == "local_election_epoch_behind"]
    assert behind == [
        {
            "event": "local_election_epoch_behind",
            "log_level": "error",
            "node_id": B,
            "path": str(tmp_path / RECORD_FILE),
            "record_epoch": 1,
            "high_water": 5,
        }
    ]
    assert "leader_state_epoch_regression" not in [e["event"] for e in logs]


@pytest.mark.anyio
async def test_a_corrupt_counter_is_logged_and_the_record_continues_the_sequence(
    tmp_path: Path,
) -> None:
    (tmp_path / RECORD_FILE).write_text(
        LocalLeaderRecord(epoch=7, leader_endpoint=A, node_id="a", pid=1).model_dump_json()
    )
    counter = tmp_path / EPOCH_FILE
    counter.write_text('{"epoch": ')
    with capture_events() as logs:
        async with driver(tmp_path, B) as node:
            assert node.current == Leader(epoch=8)
    corrupt = [e for e in logs if e["event"] == "local_election_epoch_corrupt"]
    assert [(e["log_level"], e["path"]) for e in corrupt] == [("error", str(counter))]
    assert "LocalEpochCounter" in corrupt[0]["reason"]
    assert LocalEpochCounter.model_validate_json(counter.read_bytes()).epoch == 8


@pytest.mark.anyio
async def test_leader_repairs_a_damaged_epoch_counter(tmp_path: Path) -> None:
    counter = tmp_path / EPOCH_FILE

    def repaired() -> bool:
        return counter.exists() and counter.read_bytes() == good

    with capture_events() as logs:
        async with driver(tmp_path, A) as leader:
            good = counter.read_bytes()
            assert LocalEpochCounter.model_validate_json(good).epoch == 1
            for damage in ("", "{}", '{"epoch": 0}', None):
                if damage is None:
                    counter.unlink()
                else:
                    replace_text(counter, damage)
                await eventually(repaired)
            assert leader.current == Leader(epoch=1)
    reasons = [e["reason"] for e in logs if e["event"] == "local_election_epoch_restored"]
    assert len(reasons) == 4
    assert reasons[0] == "empty (truncated?)"
    assert reasons[2:] == ["overwritten with epoch 0", "missing"]


@pytest.mark.anyio
async def test_leader_steps_down_when_the_counter_shows_a_newer_epoch(tmp_path: Path) -> None:
    seen: list[State] = []
    async with driver(tmp_path, A) as leader, anyio.create_task_group() as task_group:
        task_group.start_soon(collect, leader.leadership(), seen)
        await anyio.wait_all_tasks_blocked()
        replace_text(tmp_path / EPOCH_FILE, '{"epoch": 9}')
        assert await wait_state(leader, lambda s: s == Leader(epoch=10)) == Leader(epoch=10)
        task_group.cancel_scope.cancel()
    assert seen == [Leader(epoch=1), Unknown(), Leader(epoch=10)]


@pytest.mark.anyio
async def test_leader_holds_its_record_again_after_it_was_replaced(tmp_path: Path) -> None:
    record = tmp_path / RECORD_FILE
    async with driver(tmp_path, A) as leader, driver(tmp_path, B) as follower:
        assert follower.current == Follower(leader_endpoint=A, leader_epoch=1)
        assert not lock_is_free(tmp_path, RECORD_FILE)
        # Same content, but a file the leader does not hold.
        replace_text(record, record.read_text())
        await eventually(lambda: not lock_is_free(tmp_path, RECORD_FILE))
        await wait_state(follower, lambda s: s == Follower(leader_endpoint=A, leader_epoch=1))
        assert leader.current == Leader(epoch=1)


@pytest.mark.anyio
async def test_leader_restores_a_damaged_record(tmp_path: Path) -> None:
    record = tmp_path / RECORD_FILE
    async with driver(tmp_path, A) as leader:
        assert leader.current == Leader(epoch=1)
        good = record.read_bytes()
        record.write_text("{}")
        with anyio.fail_after(5):
            while True:
                if record.read_bytes() == good:
                    break
                await anyio.sleep(POLL)
        assert leader.current == Leader(epoch=1)


@pytest.mark.anyio
async def test_leader_steps_down_when_its_directory_is_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "election"
    seen: list[State] = []
    with capture_events() as logs:
        async with driver(directory, A) as leader, anyio.create_task_group() as task_group:
            task_group.start_soon(collect, leader.leadership(), seen)
            await anyio.wait_all_tasks_blocked()
            shutil.rmtree(directory)
            # The old lock guards nothing now: step down, recreate, win again one epoch higher.
            assert await wait_state(leader, lambda s: s == Leader(epoch=2)) == Leader(epoch=2)
            task_group.cancel_scope.cancel()
    assert seen == [Leader(epoch=1), Unknown(), Leader(epoch=2)]
    assert "local_election_lock_lost" in [e["event"] for e in logs]


@pytest.mark.anyio
async def test_a_forked_child_does_not_keep_the_leaders_locks(tmp_path: Path) -> None:
    child_waits, parent_done = os.pipe()
    parent_waits, child_ready = os.pipe()
    async with driver(tmp_path, A) as leader:
        assert leader.current == Leader(epoch=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, 3.12+
            pid = os.fork()
        if pid == 0:  # the child outlives the leader's exit, then goes without cleanup
            try:
                os.close(parent_done)
                os.write(child_ready, b"!")  # fork hooks have run by now
                os.read(child_waits, 1)
            finally:
                os._exit(0)
        os.close(child_waits)
        os.close(child_ready)
        assert os.read(parent_waits, 1) == b"!"
        os.close(parent_waits)
    try:
        assert lock_is_free(tmp_path)
        assert lock_is_free(tmp_path, RECORD_FILE)
    finally:
        os.close(parent_done)
        await anyio.to_thread.run_sync(os.waitpid, pid, 0)


def test_construction_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidEndpoint, match="scheme"):
        LocalElectionDriver(tmp_path, node_endpoint="http://127.0.0.1:7001")
    with pytest.raises(ValueError, match="poll_interval"):
        LocalElectionDriver(tmp_path, node_endpoint=A, poll_interval=0)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(LocalElectionError, match="not usable"):
        LocalElectionDriver(a_file, node_endpoint=A)
    made = tmp_path / "made" / "here"
    LocalElectionDriver(made, node_endpoint=A)
    assert made.is_dir()


# --- across processes -----------------------------------------------------------------------

STARTUP = 30.0  # interpreter start on a loaded 2-core CI machine
FAILOVER = 10.0  # generous deadline; the speed target lives in benchmarks/failover.py


@pytest.fixture
def cluster() -> Iterator[NodeSet]:
    nodes = NodeSet()
    try:
        yield nodes
    finally:
        nodes.stop_all()


def spawn(
    cluster: NodeSet, directory: Path, endpoint: str, *, backend: str = "asyncio"
) -> NodeProcess:
    return cluster.spawn(
        local_url(directory, poll_interval=0.02),
        "--endpoint",
        endpoint,
        "--backend",
        backend,
        name=f"{endpoint}#{len(cluster.nodes)}",
    )


def leader_epoch(node: NodeProcess) -> int:
    state = node.state
    assert isinstance(state, Leader), node
    return state.epoch


def test_kill9_of_the_leader_elects_a_successor_with_a_higher_epoch(
    tmp_path: Path, cluster: NodeSet
) -> None:
    endpoints = [A, B, C]
    for endpoint, backend in zip(endpoints, ["asyncio", "trio", "asyncio"], strict=True):
        spawn(cluster, tmp_path, endpoint, backend=backend)
    old = cluster.wait_stable(timeout=STARTUP)
    old_epoch = leader_epoch(old)
    old.kill9()
    assert old.wait_exit(FAILOVER) == -9
    new = cluster.wait_stable(timeout=FAILOVER)
    new_endpoint = endpoints[cluster.nodes.index(new)]
    endpoint = endpoints[cluster.nodes.index(old)]
    assert new_endpoint != endpoint
    assert leader_epoch(new) > old_epoch
    assert [node.state for node in cluster.running() if node is not new] == [
        Follower(leader_endpoint=new_endpoint, leader_epoch=leader_epoch(new))
    ]

    # The killed node comes back with the same endpoint and follows.
    back = spawn(cluster, tmp_path, endpoint)
    back.wait_for_state(lambda s: isinstance(s, Follower), timeout=STARTUP)
    assert cluster.wait_stable(timeout=FAILOVER) is new
    assert back.state == Follower(leader_endpoint=new_endpoint, leader_epoch=leader_epoch(new))
    assert_epochs_never_decrease(cluster.nodes)
    assert_one_leader_per_epoch(cluster.nodes)
    # Every candidate is recorded: every hint must name an epoch one of them led at.
    assert_history_ok(cluster.nodes, complete=True)


def test_sigterm_hands_over_and_restarts_keep_epochs_increasing(
    tmp_path: Path, cluster: NodeSet
) -> None:
    for endpoint in (A, B, C):
        spawn(cluster, tmp_path, endpoint)
    epochs = []
    for _ in range(2):
        leader = cluster.wait_stable(timeout=STARTUP)
        epochs.append(leader_epoch(leader))
        leader.terminate()
        assert leader.wait_exit(FAILOVER) == 0
        assert leader.state == Unknown()  # its last word is its resignation
    last = cluster.wait_stable(timeout=FAILOVER)
    epochs.append(leader_epoch(last))
    last.terminate()
    assert last.wait_exit(FAILOVER) == 0
    # Everyone gone; a fresh process in the same directory continues the sequence.
    fresh = spawn(cluster, tmp_path, B)
    fresh.wait_for_state(is_leader, timeout=STARTUP)
    epochs.append(leader_epoch(fresh))
    assert epochs == sorted(set(epochs)), epochs
    assert len(epochs) == 4
    fresh.terminate()
    assert fresh.wait_exit(FAILOVER) == 0
    assert_epochs_never_decrease(cluster.nodes)
    assert_one_leader_per_epoch(cluster.nodes)
    # Every candidate is recorded: every hint must name an epoch one of them led at.
    assert_history_ok(cluster.nodes, complete=True)
    assert all(not node.bad_lines for node in cluster.nodes)


@pytest.mark.anyio
async def test_resign_hands_over_and_keeps_observing(tmp_path: Path) -> None:
    async with driver(tmp_path, A) as first, driver(tmp_path, B) as second:
        assert await wait_state(first, is_leader) == Leader(epoch=1)
        await wait_state(second, lambda s: s == Follower(leader_endpoint=A, leader_epoch=1))
        await first.resign()
        assert first.current == Unknown()
        assert first.proven_until == -math.inf
        assert await wait_state(second, is_leader) == Leader(epoch=2)
        assert second.proven_until == math.inf
        # The resigned node follows its successor and never campaigns again.
        await wait_state(first, lambda s: s == Follower(leader_endpoint=B, leader_epoch=2))
        assert not first.campaigning
        await second.resign()
        await wait_state(first, lambda s: s == Unknown())
        await polls(first, 5)
        assert first.current == Unknown()


@pytest.mark.anyio
async def test_resign_during_the_winning_write_leaves_no_leader_behind(
    tmp_path: Path, held_lock: HeldLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing, finish = threading.Event(), threading.Event()
    write_durably = store.write_durably

    def slow_write(*args: Any, **kwargs: Any) -> int | None:
        writing.set()
        finish.wait(5)
        return write_durably(*args, **kwargs)

    monkeypatch.setattr(store, "write_durably", slow_write)
    seen: list[State] = []
    async with driver(tmp_path, A) as node, anyio.create_task_group() as task_group:
        task_group.start_soon(collect, node.leadership(), seen)
        held_lock.release()  # the node wins on its next poll and starts writing its record
        await eventually(writing.is_set)
        async with anyio.create_task_group() as resigning:
            resigning.start_soon(node.resign)
            await anyio.wait_all_tasks_blocked()
            finish.set()
        after_resign = len(seen)
        await polls(node, 3)
        assert node.current == Unknown()
        assert not node.is_leader
        assert not any(isinstance(state, Leader) for state in seen[after_resign:])
        # Neither the election nor the record is held: no follower can mistake it for a leader.
        assert lock_is_free(tmp_path)
        assert lock_is_free(tmp_path, RECORD_FILE)
        task_group.cancel_scope.cancel()

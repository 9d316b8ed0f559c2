"""LocalElectionDriver under a damaged or hostile election directory (issue 11, section 1).

Each test reproduces one defect found by attacking the directory: a FIFO
where a record belongs, a deleted or replaced lock file, a failing disk, a
directory or a symbolic link where a file belongs, an exhausted epoch
counter. In-process drivers share one event loop; the multi-process test
runs ``leaderwatch campaign`` nodes and checks every transition they
reported.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from nodes import (
    NodeSet,
    assert_epochs_never_decrease,
    assert_one_leader_per_epoch,
    local_url,
)
from test_local_election import (
    POLL,
    A,
    B,
    C,
    HeldLock,
    State,
    collect,
    driver,
    eventually,
    is_leader,
    live_record,
    polls,
    wait_state,
)

from leaderwatch.drivers import LocalElectionDriver
from leaderwatch.drivers import _local_store as store
from leaderwatch.drivers._local_store import LocalEpochCounter, LocalLeaderRecord
from leaderwatch.drivers.local import EPOCH_FILE, LOCK_FILE, RECORD_FILE
from leaderwatch.state import EPOCH_LIMIT, Follower, Leader, Unknown
from leaderwatch.testing import capture_events
from leaderwatch.watch import LeaderWatch


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[HeldLock]:
    """The election lock held by the test, as by a leader that has not written yet."""
    lock = HeldLock(tmp_path)
    yield lock
    lock.release()


def counter_epoch(directory: Path) -> int:
    return LocalEpochCounter.model_validate_json((directory / EPOCH_FILE).read_bytes()).epoch


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in logs if event["event"] == name]


class Transitions:
    """Every value each in-process node published, stamped with ``anyio.current_time()``.

    Stamped by a hook on :meth:`LeaderWatch.publish`, so the stamp is the
    instant of publishing, not the instant a subscriber got around to it.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[float, str, State]] = []
        publish = LeaderWatch.publish

        def stamped(watch: LeaderWatch, state: State) -> bool:
            delivered = publish(watch, state)
            self.seen.append((anyio.current_time(), watch.node_id, watch.current))
            return delivered

        monkeypatch.setattr(LeaderWatch, "publish", stamped)

    def leader_intervals(self) -> list[tuple[float, float, str, int]]:
        """``(start, end, node, epoch)`` of every Leader term; an open term ends at +inf."""
        intervals = []
        open_terms: dict[str, tuple[float, int]] = {}
        for t, node, state in self.seen:
            term = open_terms.get(node)
            if term is not None and state != Leader(epoch=term[1]):
                intervals.append((term[0], t, node, term[1]))
                del open_terms[node]
            if isinstance(state, Leader) and node not in open_terms:
                open_terms[node] = (t, state.epoch)
        intervals += [(start, float("inf"), node, e) for node, (start, e) in open_terms.items()]
        return intervals


def assert_no_overlap(intervals: list[tuple[float, float, str, int]]) -> None:
    """No two different nodes were ``Leader`` at one instant (touching ends are allowed)."""
    ordered = sorted(intervals)
    for index, (start, end, node, epoch) in enumerate(ordered):
        for other_start, other_end, other, other_epoch in ordered[index + 1 :]:
            if other_start >= end:
                break
            assert other == node, (
                f"{node} led at epoch {epoch} during [{start:.4f}, {end:.4f}) and {other} at "
                f"epoch {other_epoch} from {other_start:.4f}: overlap of "
                f"{(min(end, other_end) - other_start) * 1000:.1f} ms"
            )


# --- 2. a FIFO where a file belongs never blocks the event loop ------------------------------


class FifoUnblocker:
    """Opens the FIFO at ``path`` for writing once it has been there ``after`` seconds.

    A reader blocked in ``open()`` on the FIFO (the event loop, before the
    fix) then returns and sees end-of-file, so a failing test ends instead of
    hanging the suite; the heartbeat shows how long the loop was blocked.
    """

    def __init__(self, path: Path, after: float) -> None:
        self.path = path
        self.after = after
        self.unblocked = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _is_fifo(self) -> bool:
        try:
            return stat.S_ISFIFO(os.lstat(self.path).st_mode)
        except OSError:
            return False

    def _run(self) -> None:
        since: float | None = None
        while not self._done.wait(0.01):
            if not self._is_fifo():
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since < self.after:
                continue
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue  # no reader waiting (ENXIO), or the FIFO is gone
            os.close(fd)
            self.unblocked += 1

    def __enter__(self) -> FifoUnblocker:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


async def heartbeat(gaps: list[float]) -> None:
    """Record the longest gap between two ticks of the event loop in ``gaps[0]``."""
    last = anyio.current_time()
    while True:
        await anyio.sleep(POLL / 2)
        now = anyio.current_time()
        gaps[0] = max(gaps[0], now - last)
        last = now


def make_fifo_at(path: Path) -> None:
    temp = path.with_name(path.name + ".fifo")
    os.mkfifo(temp)
    os.replace(temp, path)


@pytest.mark.parametrize("name", [RECORD_FILE, EPOCH_FILE])
@pytest.mark.anyio
async def test_a_fifo_in_place_of_a_file_never_blocks_the_event_loop(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    gaps = [0.0]
    with capture_events() as logs, FifoUnblocker(path, after=1.0) as unblocker:
        async with (
            driver(tmp_path, A) as leader,
            driver(tmp_path, B) as follower,
            anyio.create_task_group() as task_group,
        ):
            task_group.start_soon(heartbeat, gaps)
            good = path.read_bytes()
            make_fifo_at(path)
            # The leader replaces the FIFO with its file again; nobody ever blocks on it.
            await eventually(lambda: path.is_file() and path.read_bytes() == good)
            await polls(follower, 5)
            assert leader.current == Leader(epoch=1)
            assert follower.current == Follower(leader_endpoint=A, leader_epoch=1)
            task_group.cancel_scope.cancel()
    assert gaps[0] < 0.5, f"the event loop was blocked for {gaps[0]:.2f}s"
    assert unblocker.unblocked == 0
    restored = "record" if name == RECORD_FILE else "epoch"
    reasons = [e["reason"] for e in events(logs, f"local_election_{restored}_restored")]
    assert reasons
    assert all("FIFO" in reason for reason in reasons), reasons


@pytest.mark.anyio
async def test_a_fifo_record_is_a_corrupt_record_for_followers_logged_once(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    make_fifo_at(tmp_path / RECORD_FILE)
    gaps = [0.0]
    with capture_events() as logs, FifoUnblocker(tmp_path / RECORD_FILE, after=1.0):
        async with driver(tmp_path, B) as follower, anyio.create_task_group() as task_group:
            task_group.start_soon(heartbeat, gaps)
            await polls(follower, 10)
            assert follower.current == Unknown()
            task_group.cancel_scope.cancel()
    assert gaps[0] < 0.5, f"the event loop was blocked for {gaps[0]:.2f}s"
    corrupt = events(logs, "local_election_record_corrupt")
    assert [(e["log_level"], e["path"]) for e in corrupt] == [
        ("error", str(tmp_path / RECORD_FILE))
    ]
    assert "not a regular file" in corrupt[0]["reason"]
    assert "FIFO" in corrupt[0]["reason"]


@pytest.mark.anyio
async def test_a_new_leader_replaces_fifos_and_goes_above_the_readable_file(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    (tmp_path / EPOCH_FILE).write_text('{"epoch": 6}')
    make_fifo_at(tmp_path / RECORD_FILE)
    with FifoUnblocker(tmp_path / RECORD_FILE, after=1.0) as unblocker:
        async with driver(tmp_path, B) as node:
            held_lock.release()
            assert await wait_state(node, is_leader) == Leader(epoch=7)
            assert (tmp_path / RECORD_FILE).is_file()
    assert unblocker.unblocked == 0


# --- 3. a deleted or replaced lock file never gives two leaders at once ------------------------


def delete_lock(directory: Path) -> None:
    (directory / LOCK_FILE).unlink()


def replace_lock(directory: Path) -> None:
    temp = directory / (LOCK_FILE + ".new")
    temp.write_bytes(b"")
    temp.replace(directory / LOCK_FILE)


LOCK_DAMAGE: dict[str, Callable[[Path], None]] = {"deleted": delete_lock, "replaced": replace_lock}


@pytest.mark.parametrize("damage", list(LOCK_DAMAGE))
@pytest.mark.anyio
async def test_a_lost_lock_file_never_gives_two_leaders_at_once(
    tmp_path: Path, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old leader polls slowly, so a newcomer that did not wait for it would lead first.
    transitions = Transitions(monkeypatch)
    old = LocalElectionDriver(tmp_path, node_endpoint=A, poll_interval=0.3)
    new = driver(tmp_path, B)
    with capture_events() as logs:
        async with old, new:
            assert old.current == Leader(epoch=1)
            await wait_state(new, lambda s: s == Follower(leader_endpoint=A, leader_epoch=1))
            LOCK_DAMAGE[damage](tmp_path)
            assert await wait_state(new, is_leader) == Leader(epoch=2)
            await wait_state(old, lambda s: s == Follower(leader_endpoint=B, leader_epoch=2))
    assert_no_overlap(transitions.leader_intervals())
    assert [e["node_id"] for e in events(logs, "local_election_lock_lost")] == [A]


@pytest.mark.anyio
async def test_a_newcomer_waits_while_a_live_leader_holds_the_record(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    # A live leader at epoch 3 whose lock file was deleted: the newcomer gets a fresh lock
    # file, but may lead only once that leader let go of its record.
    writer = live_record(tmp_path, 3, A)
    try:
        delete_lock(tmp_path)
        async with driver(tmp_path, B) as node:
            await polls(node, 10)
            assert node.current == Follower(leader_endpoint=A, leader_epoch=3)
            assert not node.is_leader
            writer.release()
            assert await wait_state(node, is_leader) == Leader(epoch=4)
    finally:
        writer.release()


@pytest.mark.anyio
async def test_a_lock_file_replaced_during_the_winning_write_publishes_no_leader(
    tmp_path: Path, held_lock: HeldLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another node may lock the new file while this one writes: only one of them may lead.
    writing, finish = threading.Event(), threading.Event()
    write_durably = store.write_durably

    def slow_write(*args: Any, **kwargs: Any) -> int | None:
        writing.set()
        finish.wait(5)
        return write_durably(*args, **kwargs)

    monkeypatch.setattr(store, "write_durably", slow_write)
    seen: list[State] = []
    with capture_events() as logs:
        async with driver(tmp_path, A) as node, anyio.create_task_group() as task_group:
            task_group.start_soon(collect, node.leadership(), seen)
            held_lock.release()
            await eventually(writing.is_set)
            replace_lock(tmp_path)
            monkeypatch.setattr(store, "write_durably", write_durably)
            finish.set()
            assert await wait_state(node, is_leader) == Leader(epoch=2)
            task_group.cancel_scope.cancel()
    assert Leader(epoch=1) not in seen
    assert [e["node_id"] for e in events(logs, "local_election_lock_lost")] == [A]


STARTUP = 30.0
FAILOVER = 10.0


@pytest.fixture
def cluster() -> Iterator[NodeSet]:
    nodes = NodeSet()
    try:
        yield nodes
    finally:
        nodes.stop_all()


def test_processes_never_lead_together_when_the_lock_file_is_lost(
    tmp_path: Path, cluster: NodeSet
) -> None:
    def spawn(endpoint: str, poll: float) -> None:
        cluster.spawn(
            local_url(tmp_path, poll_interval=poll), "--endpoint", endpoint, name=endpoint
        )

    # The first leader polls slowly: a successor that did not wait would overlap it.
    spawn(A, 0.3)
    cluster.wait_stable(timeout=STARTUP)
    spawn(B, 0.02)
    spawn(C, 0.02)
    leader = cluster.wait_stable(timeout=STARTUP)
    for round_number in range(4):
        epoch = leader.state.epoch if isinstance(leader.state, Leader) else -1
        LOCK_DAMAGE["deleted" if round_number % 2 == 0 else "replaced"](tmp_path)

        def moved_on(nodes: NodeSet, epoch: int = epoch) -> bool:
            leaders = nodes.leaders()
            return len(leaders) == 1 and getattr(leaders[0].state, "epoch", -1) > epoch

        cluster.wait_for(moved_on, timeout=FAILOVER)
        leader = cluster.wait_stable(timeout=FAILOVER)
    for node in cluster.nodes:
        node.terminate()
    for node in cluster.nodes:
        assert node.wait_exit(FAILOVER) == 0, node.describe()
    intervals = []
    for node in cluster.nodes:
        reports = node.reports
        for index, report in enumerate(reports):
            if isinstance(report.state, Leader):
                end = reports[index + 1].t if index + 1 < len(reports) else float("inf")
                intervals.append((report.t, end, node.name, report.state.epoch))
    assert len(intervals) >= 5
    assert_no_overlap(intervals)
    assert_epochs_never_decrease(cluster.nodes)
    assert_one_leader_per_epoch(cluster.nodes)


# --- 7. damage is logged once and never churns -------------------------------------------------


@pytest.mark.anyio
async def test_a_failing_write_is_logged_once_per_distinct_failure(
    tmp_path: Path, held_lock: HeldLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    failure = [errno.ENOSPC]
    real_open = os.open

    def full_disk(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_EXCL and str(path).endswith(".tmp"):
            raise OSError(failure[0], os.strerror(failure[0]), str(path))
        return real_open(path, flags, *args, **kwargs)

    node = driver(tmp_path, B)
    monkeypatch.setattr(os, "open", full_disk)
    with capture_events() as logs:
        async with node:
            held_lock.release()
            await polls(node, 10)
            failure[0] = errno.EIO
            await polls(node, 10)
            assert node.current == Unknown()
            monkeypatch.setattr(os, "open", real_open)
            assert await wait_state(node, is_leader) == Leader(epoch=1)
    failed = events(logs, "local_election_write_failed")
    assert [e["reason"] for e in failed] == [os.strerror(errno.ENOSPC), os.strerror(errno.EIO)]
    assert all(".tmp" not in repr(e) for e in failed)


@pytest.mark.parametrize("name", [RECORD_FILE, EPOCH_FILE])
@pytest.mark.anyio
async def test_a_directory_in_place_of_a_file_burns_no_epochs_and_is_logged_once(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    with capture_events() as logs:
        async with driver(tmp_path, A) as leader, driver(tmp_path, B) as follower:
            assert leader.current == Leader(epoch=1)
            path.unlink()
            path.mkdir()
            await polls(follower, 20)
            # The leader keeps its office (the lock is still its own) and burns no epoch.
            assert leader.current == Leader(epoch=1)
            if name == RECORD_FILE:
                assert follower.current == Unknown()
                assert counter_epoch(tmp_path) == 1
            else:
                assert follower.current == Follower(leader_endpoint=A, leader_epoch=1)
            path.rmdir()
            await eventually(path.is_file)
            await wait_state(follower, lambda s: s == Follower(leader_endpoint=A, leader_epoch=1))
            assert leader.current == Leader(epoch=1)
            assert counter_epoch(tmp_path) == 1
    blocked = events(logs, "local_election_unrepairable")
    assert [(e["node_id"], e["path"]) for e in blocked] == [(A, str(path))]
    assert "directory" in blocked[0]["reason"]
    assert not events(logs, "local_election_write_failed")


@pytest.mark.parametrize("name", [RECORD_FILE, EPOCH_FILE])
@pytest.mark.anyio
async def test_no_candidate_takes_office_over_a_directory_in_place_of_a_file(
    tmp_path: Path, held_lock: HeldLock, name: str
) -> None:
    (tmp_path / EPOCH_FILE).write_text('{"epoch": 3}')
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).mkdir()
    with capture_events() as logs:
        async with driver(tmp_path, A) as first, driver(tmp_path, B) as second:
            held_lock.release()
            await polls(first, 20)
            await polls(second, 20)
            assert first.current == second.current == Unknown()
            (tmp_path / name).rmdir()
            if name == EPOCH_FILE:
                (tmp_path / EPOCH_FILE).write_text('{"epoch": 3}')
            await eventually(lambda: first.is_leader or second.is_leader)
            assert counter_epoch(tmp_path) == 4
    blocked = events(logs, "local_election_unrepairable")
    assert sorted(e["node_id"] for e in blocked) == [A, B]
    assert not events(logs, "local_election_write_failed")


def symlink_to_record(directory: Path) -> None:
    (directory / "link").symlink_to(RECORD_FILE)
    (directory / "link").replace(directory / LOCK_FILE)


def symlink_elsewhere(directory: Path) -> None:
    elsewhere = directory.parent / f"{directory.name}-elsewhere.lock"
    elsewhere.touch()
    (directory / "link").symlink_to(elsewhere)
    (directory / "link").replace(directory / LOCK_FILE)


def fifo_lock(directory: Path) -> None:
    make_fifo_at(directory / LOCK_FILE)


LOCK_FILE_DAMAGE: dict[str, Callable[[Path], None]] = {
    "symlink to the record": symlink_to_record,
    "symlink elsewhere": symlink_elsewhere,
    "FIFO": fifo_lock,
}


@pytest.mark.parametrize("damage", list(LOCK_FILE_DAMAGE))
@pytest.mark.anyio
async def test_a_lock_file_that_is_not_a_regular_file_stops_elections_without_churn(
    tmp_path: Path, damage: str
) -> None:
    directory = tmp_path / "election"
    with capture_events() as logs:
        async with driver(directory, A) as first, driver(directory, B) as second:
            assert first.current == Leader(epoch=1)
            LOCK_FILE_DAMAGE[damage](directory)
            await wait_state(first, lambda s: s == Unknown())
            await polls(first, 20)
            assert first.current == second.current == Unknown()
            assert counter_epoch(directory) == 1
            (directory / LOCK_FILE).unlink()  # the operator removes it; a candidate recreates it
            await eventually(lambda: first.is_leader or second.is_leader)
            assert counter_epoch(directory) == 2
    damaged = events(logs, "local_election_lock_damaged")
    assert sorted(e["node_id"] for e in damaged) == [A, B]
    assert all("not a regular file" in e["reason"] for e in damaged)
    assert [e["node_id"] for e in events(logs, "local_election_lock_lost")] == [A]


@pytest.mark.anyio
async def test_an_exhausted_epoch_counter_stops_elections_without_exiting(tmp_path: Path) -> None:
    last = EPOCH_LIMIT - 1
    with capture_events() as logs:
        async with driver(tmp_path, A) as first, driver(tmp_path, B) as second:
            assert first.current == Leader(epoch=1)
            (tmp_path / "new").write_text(f'{{"epoch": {last}}}')
            (tmp_path / "new").replace(tmp_path / EPOCH_FILE)
            await wait_state(first, lambda s: s == Unknown())
            await polls(first, 20)
            assert first.current == second.current == Unknown()
            # The operator restores the counter: the election resumes, above every used epoch.
            (tmp_path / "new").write_text('{"epoch": 1}')
            (tmp_path / "new").replace(tmp_path / EPOCH_FILE)
            await eventually(lambda: first.is_leader or second.is_leader)
            assert counter_epoch(tmp_path) == 2
    exhausted = events(logs, "local_election_epochs_exhausted")
    assert sorted(e["node_id"] for e in exhausted) == [A, B]
    assert all(e["log_level"] == "error" and e["epoch"] == last for e in exhausted)


@pytest.mark.anyio
async def test_a_record_at_the_last_epoch_is_followed_and_then_exhausts_the_directory(
    tmp_path: Path, held_lock: HeldLock
) -> None:
    last = EPOCH_LIMIT - 1
    (tmp_path / EPOCH_FILE).write_text(f'{{"epoch": {last}}}')
    writer = live_record(tmp_path, last, A)
    try:
        with capture_events() as logs:
            async with driver(tmp_path, B) as node:
                assert node.current == Follower(leader_endpoint=A, leader_epoch=last)
                writer.release()
                held_lock.release()
                await wait_state(node, lambda s: s == Unknown())
                await polls(node, 10)
                assert node.current == Unknown()
        assert len(events(logs, "local_election_epochs_exhausted")) == 1
    finally:
        writer.release()
    record = LocalLeaderRecord.model_validate_json((tmp_path / RECORD_FILE).read_bytes())
    assert record.epoch == last

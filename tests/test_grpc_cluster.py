"""A gRPC service of three node processes (LocalElectionDriver + LeaderNode + LeaderInterceptor).

Each node is ``tests/grpc_node_server.py`` in its own process on a free
loopback port; the client is a ``LeaderChannelPool`` in this process. Every
node appends one JSON line per call it served to a shared events file, with
``time.monotonic()`` stamps (one clock for all processes of a Linux host).

grpc.aio runs on asyncio only and binds process-wide state to the first
event loop it sees, so this module pins asyncio and runs in one loop.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc.aio
import pytest
from grpc_cluster import Cluster
from grpc_service import TicketStub

from leaderwatch.grpc import LeaderChannelPool
from leaderwatch.retry import RetryPolicy

pytestmark = pytest.mark.anyio

POLICY = RetryPolicy(
    deadline=8.0, attempt_timeout=1.0, backoff_initial=0.01, backoff_maximum=0.1, jitter=0.5
)
CALL_TIMEOUT = 5.0
"""Each call's own deadline: it must succeed within it, failover included."""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_per_module() -> None:
    """Run every test of this module in one event loop (grpc.aio binds to its first loop)."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[int], Cluster]]:
    made: list[Cluster] = []

    def make(size: int = 3) -> Cluster:
        made.append(Cluster(tmp_path, size))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@pytest.fixture
async def pool_for() -> AsyncIterator[Callable[..., LeaderChannelPool]]:
    pools: list[LeaderChannelPool] = []

    def make(endpoints: list[str], **options: Any) -> LeaderChannelPool:
        options.setdefault("policy", POLICY)
        pools.append(LeaderChannelPool(endpoints, **options))
        return pools[-1]

    yield make
    for pool in pools:
        await pool.close()


async def until(predicate: Callable[[], bool], *, within: float) -> None:
    """Poll ``predicate`` (state of other tasks and processes) until true, or fail."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - the state lives in other processes too
            await anyio.sleep(0.01)


def assert_one_node_per_epoch(events: list[dict[str, Any]]) -> dict[int, str]:
    serving: dict[int, set[str]] = defaultdict(set)
    for event in events:
        if event["kind"] in ("call", "admitted"):
            assert event["epoch"] is not None, event  # every served call was admitted
            serving[event["epoch"]].add(event["node"])
    assert all(len(nodes) == 1 for nodes in serving.values()), dict(serving)
    return {epoch: nodes.pop() for epoch, nodes in serving.items()}


async def test_calls_to_followers_reach_the_leader(
    cluster: Callable[[int], Cluster], pool_for: Callable[..., LeaderChannelPool]
) -> None:
    nodes = cluster(3)
    discover = pool_for(nodes.endpoints)
    first = await discover.stub(TicketStub).Who(b"", timeout=CALL_TIMEOUT)
    leader = first["endpoint"]
    followers = [endpoint for endpoint in nodes.endpoints if endpoint != leader]
    # A client that knows only the followers: their hints take it to the leader.
    pool = pool_for(followers)
    stub = pool.stub(TicketStub)
    for _ in range(5):
        reply = await stub.Who(b"", timeout=CALL_TIMEOUT)
        assert (reply["endpoint"], reply["epoch"]) == (leader, first["epoch"])
    streamed = [reply async for reply in stub.Count(b"3", timeout=CALL_TIMEOUT)]
    assert [r["endpoint"] for r in streamed] == [leader] * 3
    assert pool.cache.cached_leader == (leader, first["epoch"])
    served = assert_one_node_per_epoch(nodes.served())
    assert served == {first["epoch"]: leader}


async def test_kill_9_of_the_leader_during_a_stream_of_calls(
    cluster: Callable[[int], Cluster], pool_for: Callable[..., LeaderChannelPool]
) -> None:
    nodes = cluster(3)
    pool = pool_for(nodes.endpoints)
    stub = pool.stub(TicketStub, idempotent=True)  # a read: safe to re-send after a broken call
    replies: list[tuple[str, int]] = []
    streamed: list[tuple[str, int]] = []
    failures: list[BaseException] = []
    broken_streams: list[BaseException] = []
    killed: list[str] = []
    done = anyio.Event()

    async def unary_caller() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Who(b"", timeout=CALL_TIMEOUT)
            except Exception as error:  # every call must succeed: record, then fail below
                failures.append(error)
                continue
            assert time.monotonic() - started < CALL_TIMEOUT + 0.5
            replies.append((reply["endpoint"], reply["epoch"]))

    async def stream_caller() -> None:
        while not done.is_set():
            got: list[dict[str, Any]] = []
            try:
                async for reply in stub.Count(b"2", timeout=CALL_TIMEOUT):
                    got.append(reply)
            except Exception as error:
                if not got:  # retried until the first message: it must not fail before it
                    failures.append(error)
                else:  # broken mid-stream by the kill: raised as is, never retried
                    broken_streams.append(error)
                continue
            assert len({(r["endpoint"], r["epoch"]) for r in got}) == 1
            streamed.append((got[0]["endpoint"], got[0]["epoch"]))

    async def chaos() -> None:
        await until(lambda: len(replies) >= 20, within=20)
        leader = replies[-1][0]
        killed.append(leader)
        nodes.node(leader).kill(signal.SIGKILL)
        # Keep calling until the successor served 20 more calls.
        await until(lambda: sum(1 for e, _ in replies if e != leader) >= 20, within=20)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(unary_caller)
        tg.start_soon(stream_caller)
        tg.start_soon(chaos)

    assert failures == []
    assert len(broken_streams) <= 1  # only the stream the kill cut, if any
    assert all(type(error) is grpc.aio.AioRpcError for error in broken_streams)
    for sequence in (replies, streamed):
        epochs = [epoch for _, epoch in sequence]
        assert epochs == sorted(epochs), epochs  # never decreasing along the client's sequence
    by_epoch: dict[int, set[str]] = defaultdict(set)
    for endpoint, epoch in replies + streamed:
        by_epoch[epoch].add(endpoint)
    assert all(len(endpoints) == 1 for endpoints in by_epoch.values()), by_epoch
    assert len(by_epoch) >= 2  # the successor took over at a higher epoch
    assert replies[-1][0] != killed[0]
    assert_one_node_per_epoch(nodes.served())


async def test_graceful_stop_drains_admitted_calls_before_the_successor_serves(
    cluster: Callable[[int], Cluster], pool_for: Callable[..., LeaderChannelPool]
) -> None:
    nodes = cluster(3)
    pool = pool_for(nodes.endpoints)
    stub = pool.stub(TicketStub)
    first = await stub.Who(b"", timeout=CALL_TIMEOUT)
    old_leader, old_epoch = first["endpoint"], first["epoch"]
    slow_replies: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []

    async def slow_call() -> None:
        slow_replies.append(await stub.Slow(b"800", timeout=CALL_TIMEOUT))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(slow_call)
        # All three admitted on the leader.
        await until(lambda: sum(e["kind"] == "admitted" for e in nodes.served()) >= 3, within=10)
        stopped_at = time.monotonic()
        nodes.node(old_leader).kill(signal.SIGTERM)
        while len(later) < 10:
            later.append(await stub.Who(b"", timeout=CALL_TIMEOUT))
    # Calls admitted before the stop completed on the old leader, at its epoch.
    assert [(r["endpoint"], r["epoch"]) for r in slow_replies] == [(old_leader, old_epoch)] * 3
    assert len({r["endpoint"] for r in later[-5:]}) == 1
    successor = later[-1]["endpoint"]
    assert successor != old_leader
    assert later[-1]["epoch"] > old_epoch
    epochs = [r["epoch"] for r in later]
    assert epochs == sorted(epochs)
    events = nodes.served()
    assert_one_node_per_epoch(events)
    old_work = [e for e in events if e["node"] == old_leader and e["kind"] == "call"]
    new_work = [e for e in events if e["node"] == successor and e["kind"] in ("call", "admitted")]
    # The old leader finished everything it admitted before the successor served anything.
    last_old = max(e["t"] for e in old_work)
    first_new = min(e.get("t0", e.get("t")) for e in new_work)
    assert last_old <= first_new, (last_old, first_new)
    assert all(e["t"] - stopped_at < 0.8 + 2.0 for e in old_work if e["method"] == "Slow")
    old_process = nodes.node(old_leader).process
    assert old_process.wait(15) == 0  # a graceful exit

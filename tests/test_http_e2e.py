"""End to end: real uvicorn node processes and the real leader-aware httpx client together.

Each node is ``tests/http_node_app.py`` (``LeaderNode`` + ``LeaderRedirectMiddleware``
under ``leaderwatch.uvicorn.serve``) on a free loopback port; the nodes elect
through a shared ``LocalElectionDriver`` directory, or through a real etcd
server in the one etcd test. The client is an ``httpx.AsyncClient`` with
``LeaderAwareTransport`` in this process, over real sockets (TLS where said).
Every node appends one JSON line per admitted request and leader-job
start/stop to a shared events file, with ``time.monotonic()`` stamps (one
clock for all processes of a Linux host), so the tests check what the
servers did, not only what the client saw.

What is covered elsewhere is not repeated here: the fence answering 503
(test_asgi), leader-only jobs cancelled on a graceful step-down and a driver
failure ending the process (test_uvicorn).

The module pins asyncio (uvicorn's loop; the client runs on anyio either way).
"""

from __future__ import annotations

import signal
import ssl
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from anyio.streams.tls import TLSListener
from etcd_server import EtcdServer
from http_cluster import HttpCluster, TLSFiles

from leaderwatch.client import LeaderCache
from leaderwatch.httpx import LeaderAwareTransport
from leaderwatch.retry import RetryPolicy
from leaderwatch.testing import capture_events

pytestmark = pytest.mark.anyio

POLICY = RetryPolicy(
    deadline=6.0, attempt_timeout=1.0, backoff_initial=0.01, backoff_maximum=0.1, jitter=0.5
)
SLACK = 0.5
"""Seconds a request may overrun its deadline on a loaded 2-core machine (the client's own
scheduling and the last attempt's close)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., HttpCluster]]:
    made: list[HttpCluster] = []

    def make(size: int = 3, *, tls: TLSFiles | None = None, **env: str) -> HttpCluster:
        base = tmp_path / f"cluster{len(made)}"
        base.mkdir()
        made.append(HttpCluster(base, size, tls=tls, **env))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@dataclass(frozen=True)
class Sent:
    at: float
    endpoint: str
    stream: int


class CountingTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, noting when each attempt was sent, where, and by which task.

    A subclass, not a wrapper, so the leader-aware transport still sees httpx's
    transport and relies on its timeouts.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sent: list[Sent] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        endpoint = request.url.netloc.decode("ascii")
        self.sent.append(Sent(time.monotonic(), endpoint, anyio.get_current_task().id))
        return await super().handle_async_request(request)

    def endpoints(self) -> list[str]:
        return [sent.endpoint for sent in self.sent]

    def assert_not_ping_ponged(
        self, dead: str, others: list[str], after: float, before: float
    ) -> int:
        """Between ``after`` and ``before``, each stream tried ``dead`` at most once per round
        of the worklist (where it comes last, after every other endpoint) plus the attempt it
        had in flight, never once per hint naming it; returns the attempts to ``dead``."""
        streams: dict[int, list[str]] = defaultdict(list)
        for sent in self.sent:
            if after < sent.at < before:
                streams[sent.stream].append(sent.endpoint)
        for sequence in streams.values():
            fewest = min(sequence.count(other) for other in others)
            assert sequence.count(dead) <= fewest + 1, sequence
        return sum(sequence.count(dead) for sequence in streams.values())


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., tuple[httpx.AsyncClient, CountingTransport]]]:
    clients: list[httpx.AsyncClient] = []

    def make(
        endpoints: list[str], *, verify: ssl.SSLContext | bool = True, **options: Any
    ) -> tuple[httpx.AsyncClient, CountingTransport]:
        inner = CountingTransport(verify=verify)
        options.setdefault("policy", POLICY)
        transport = LeaderAwareTransport(endpoints, inner=inner, **options)
        scheme = options.get("scheme", "http")
        clients.append(httpx.AsyncClient(transport=transport, base_url=f"{scheme}://tickets"))
        return clients[-1], inner

    yield make
    for each in clients:
        await each.aclose()


def transport_of(client: httpx.AsyncClient) -> LeaderAwareTransport:
    transport = client._transport
    assert isinstance(transport, LeaderAwareTransport)
    return transport


# --- a stream of requests, as the client saw it ---------------------------------------------


@dataclass(frozen=True)
class Reply:
    stream: str
    endpoint: str
    epoch: int
    started: float
    finished: float


@dataclass
class Load:
    """Streams of sequential requests (tickets with idempotency keys, and reads)."""

    client: httpx.AsyncClient
    replies: list[Reply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: anyio.Event = field(default_factory=anyio.Event)

    def start(self, task_group: TaskGroup, tickets: int = 2, reads: int = 2) -> None:
        for index in range(tickets):
            task_group.start_soon(self._stream, f"tickets{index}", "POST", "/tickets")
        for index in range(reads):
            task_group.start_soon(self._stream, f"reads{index}", "GET", "/whoami")

    async def _stream(self, name: str, method: str, path: str) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                response = await self.client.request(method, path)
            except httpx.HTTPError as error:  # every request must succeed: noted, failed below
                self.failures.append(f"{name}: {type(error).__name__}: {error}")
                continue
            finished = time.monotonic()
            if response.status_code != 200:
                self.failures.append(f"{name}: {response.status_code} {response.text}")
                continue
            body = response.json()
            assert int(response.headers["leader-epoch"]) == body["epoch"]
            self.replies.append(Reply(name, body["endpoint"], body["epoch"], started, finished))

    def served_by(self, endpoint: str) -> list[Reply]:
        return [reply for reply in self.replies if reply.endpoint == endpoint]

    def check(self) -> dict[int, str]:
        """Every request succeeded within its deadline; epochs never went down along any
        stream nor along the client's whole sequence; each epoch was served by one node."""
        assert self.failures == []
        slowest = max(reply.finished - reply.started for reply in self.replies)
        assert slowest < POLICY.deadline + SLACK, slowest
        streams: dict[str, list[int]] = defaultdict(list)
        for reply in self.replies:
            streams[reply.stream].append(reply.epoch)
        for epochs in [*streams.values(), [reply.epoch for reply in self.replies]]:
            assert epochs == sorted(epochs), epochs
        by_epoch: dict[int, set[str]] = defaultdict(set)
        for reply in self.replies:
            by_epoch[reply.epoch].add(reply.endpoint)
        assert all(len(nodes) == 1 for nodes in by_epoch.values()), dict(by_epoch)
        return {epoch: nodes.pop() for epoch, nodes in by_epoch.items()}


async def until(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll ``predicate`` (the state of other tasks and processes) until true, or fail."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await anyio.sleep(0.01)


def served_events(cluster: HttpCluster) -> list[dict[str, Any]]:
    return [event for event in cluster.events() if event["kind"] in ("admitted", "request")]


def one_node_per_epoch(events: list[dict[str, Any]], kinds: tuple[str, ...]) -> dict[int, str]:
    """Which node did work at each epoch, asserting there was exactly one."""
    nodes: dict[int, set[str]] = defaultdict(set)
    for event in events:
        if event["kind"] in kinds:
            assert event["epoch"] is not None, event  # every served request was admitted
            nodes[event["epoch"]].add(event["node"])
    assert all(len(each) == 1 for each in nodes.values()), dict(nodes)
    return {epoch: each.pop() for epoch, each in nodes.items()}


# --- 1. a request sent to a follower lands on the leader, intact ---------------------------


async def test_requests_sent_to_followers_land_on_the_leader_intact(
    cluster: Callable[..., HttpCluster],
    client_for: Callable[..., tuple[httpx.AsyncClient, CountingTransport]],
) -> None:
    nodes = cluster(3)
    leader = nodes.wait_leader()
    followers = [endpoint for endpoint in nodes.endpoints if endpoint != leader.endpoint]
    epoch = leader.status()["epoch"]  # type: ignore[index]
    target = "/echo/a%2Fb/caf%C3%A9?q=1&x=a%20b&q=2"
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        # A client that knows only the followers: every request goes to one of them first.
        client, sent = client_for(followers)
        response = await client.request(method, target, content=f"body of {method}".encode())
        assert response.status_code == 200
        assert response.json() == {
            "endpoint": leader.endpoint,
            "epoch": epoch,
            "method": method,
            "raw_path": "/echo/a%2Fb/caf%C3%A9",
            "query": "q=1&x=a%20b&q=2",
            "body": f"body of {method}",
        }
        assert response.extensions["leaderwatch.endpoint"] == leader.endpoint
        assert sent.endpoints()[1:] == [leader.endpoint]
        assert sent.endpoints()[0] in followers
    # A fenced ticket, issued through a follower: stamped with the epoch that admitted it.
    client, sent = client_for(followers, idempotency_keys=True)
    ticket = await client.post("/tickets", json={"for": "alice"})
    assert ticket.status_code == 200
    assert (ticket.json()["endpoint"], ticket.json()["epoch"]) == (leader.endpoint, epoch)
    assert ticket.headers["leader-epoch"] == str(epoch)
    assert transport_of(client).cache.cached_leader == (leader.endpoint, epoch)
    again = await client.post("/tickets", json={"for": "bob"})
    assert again.json()["number"] == ticket.json()["number"] + 1
    assert sent.endpoints()[-1:] == [leader.endpoint]  # straight to the leader now
    # The servers agree: the followers redirected six requests, the leader served them.
    redirected = sum(nodes.node(endpoint).stats()["redirected"] for endpoint in followers)
    assert redirected == 6
    assert leader.stats()["admitted"] == {str(epoch): 7}
    assert one_node_per_epoch(served_events(nodes), ("request",)) == {epoch: leader.endpoint}


# --- 2. kill -9 of the leader during a stream of requests ----------------------------------


async def test_kill_9_of_the_leader_during_a_stream_of_requests(
    cluster: Callable[..., HttpCluster],
    client_for: Callable[..., tuple[httpx.AsyncClient, CountingTransport]],
) -> None:
    # Followers poll the lock every 100 ms: for that long they still name the dead leader.
    nodes = cluster(3, LW_POLL="0.1")
    old = nodes.wait_leader()
    client, sent = client_for(nodes.endpoints, idempotency_keys=True)
    load = Load(client)
    killed_at: list[float] = []
    logged_at_kill: list[int] = []

    with capture_events() as logs:
        async with anyio.create_task_group() as task_group:
            load.start(task_group)
            await until(lambda: len(load.served_by(old.endpoint)) >= 20, within=20, what="traffic")
            killed_at.append(time.monotonic())
            logged_at_kill.append(len(logs))
            old.signal(signal.SIGKILL)
            await until(
                lambda: len(load.replies) - len(load.served_by(old.endpoint)) >= 20,
                within=20,
                what="20 replies from the successor",
            )
            load.stop.set()

    served = load.check()
    killed = killed_at[0]
    old_epoch = next(epoch for epoch, node in served.items() if node == old.endpoint)
    assert len(served) == 2
    assert max(served) > old_epoch
    assert served[max(served)] != old.endpoint
    assert old.wait_exit() == -signal.SIGKILL
    # The servers agree with the client: one node per epoch, nothing after the kill (give
    # or take the moment SIGKILL needs to stop a process running on another core).
    events = served_events(nodes)
    assert one_node_per_epoch(events, ("admitted", "request")) == served
    assert all(e["t0"] < killed + 0.05 for e in events if e["node"] == old.endpoint)
    # Leader-only jobs ran on exactly one node per term, the successor's in its own term.
    jobs = one_node_per_epoch(nodes.events(), ("job_start",))
    assert jobs == served
    # The dead leader was not ping-ponged: followers still named it, and no hint naming it
    # was followed after the kill; each stream tried it at most once per round of the
    # worklist (where it comes last), against one attempt per hint before record_failure.
    cache = transport_of(client).cache
    assert cache.stats.refused.get("endpoint_recently_failed", 0) >= 1
    assert not [
        event
        for event in logs[logged_at_kill[0] :]
        if event["event"] == "leader_attempt_not_served"
        and event["decision"] == "followed"
        and old.endpoint in event["outcome"]
    ]
    first_new = min(reply.finished for reply in load.replies if reply.endpoint != old.endpoint)
    others = [endpoint for endpoint in nodes.endpoints if endpoint != old.endpoint]
    sent.assert_not_ping_ponged(old.endpoint, others, after=killed, before=first_new)
    assert cache.cached_leader is not None
    assert cache.cached_leader.endpoint == served[max(served)]


# --- 3. graceful stop: drained on the old leader, then the successor ------------------------


async def test_graceful_stop_drains_admitted_requests_and_never_overlaps(
    cluster: Callable[..., HttpCluster],
    client_for: Callable[..., tuple[httpx.AsyncClient, CountingTransport]],
) -> None:
    nodes = cluster(3)
    old = nodes.wait_leader()
    # One redirect per request: while the old leader drains (about 800 ms), followers keep
    # naming it. Those hints must not use up the budget (they count as "no leader yet").
    policy = POLICY.model_copy(update={"max_redirects": 1})
    client, _ = client_for(nodes.endpoints, idempotency_keys=True, policy=policy)
    load = Load(client)
    slow: list[httpx.Response] = []
    stopped_at: list[float] = []

    async def slow_ticket() -> None:
        slow.append(await client.post("/tickets?hold_ms=800", json={}))

    async with anyio.create_task_group() as task_group:
        load.start(task_group)
        await until(lambda: len(load.replies) >= 10, within=20, what="traffic")
        for _ in range(3):
            task_group.start_soon(slow_ticket)
        await until(
            lambda: sum(1 for e in nodes.events() if e.get("hold_ms")) >= 3,
            within=10,
            what="the slow tickets to be admitted",
        )
        stopped_at.append(time.monotonic())
        old.signal(signal.SIGTERM)
        await until(
            lambda: len(load.replies) - len(load.served_by(old.endpoint)) >= 20,
            within=20,
            what="20 replies from the successor",
        )
        load.stop.set()

    served = load.check()  # no request failed: not even by running out of redirects
    stopped = stopped_at[0]
    old_epoch = next(epoch for epoch, node in served.items() if node == old.endpoint)
    successor = served[max(served)]
    assert successor != old.endpoint
    # The tickets admitted before the stop completed on the old leader, at its epoch.
    assert [(r.status_code, r.json()["endpoint"], r.json()["epoch"]) for r in slow] == [
        (200, old.endpoint, old_epoch)
    ] * 3
    assert all(r.json()["t1"] > stopped for r in slow)  # they were still running at the stop
    assert old.wait_exit() == 0
    # None was served by the old leader after its successor served: no overlap at all.
    events = served_events(nodes)
    assert one_node_per_epoch(events, ("admitted", "request")) == served
    old_done = [e["t1"] for e in events if e["node"] == old.endpoint and e["kind"] == "request"]
    new_started = [e["t0"] for e in events if e["node"] == successor]
    assert max(old_done) <= min(new_started)
    first_new = min(r.finished for r in load.replies if r.endpoint == successor)
    assert all(r.finished <= first_new for r in load.served_by(old.endpoint))
    assert transport_of(client).cache.stats.gave_up == {}


# --- 4. stale and plaintext hints, over real TLS -------------------------------------------


@dataclass
class Rogue:
    """A TLS endpoint answering every request with a crafted 307 (it is no leaderwatch node)."""

    endpoint: str
    hits: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive()
                head += chunk
            self.hits += 1
            lines = [f"{name}: {value}" for name, value in self.headers.items()]
            response = "\r\n".join(
                ["HTTP/1.1 307 Temporary Redirect", *lines, "content-length: 0", "", ""]
            )
            await stream.send(response.encode())


@dataclass
class Trap:
    """A plaintext listener: a client that obeyed an ``http://`` hint would connect here."""

    endpoint: str
    connections: int = 0

    async def handle(self, stream: SocketStream) -> None:
        self.connections += 1
        await stream.aclose()


async def test_stale_and_plaintext_hints_are_not_followed_over_tls(
    cluster: Callable[..., HttpCluster],
    client_for: Callable[..., tuple[httpx.AsyncClient, CountingTransport]],
    tmp_path: Path,
) -> None:
    tls = TLSFiles(tmp_path)
    nodes = cluster(2, tls=tls)
    leader = nodes.wait_leader()
    follower = next(node for node in nodes.nodes if node is not leader)
    epoch = leader.status()["epoch"]  # type: ignore[index]
    verify = tls.client_context()

    # A real follower's redirect over TLS: scheme-less hint, https Location, followed.
    client, sent = client_for([follower.endpoint], scheme="https", verify=verify)
    response = await client.get("/whoami?x=1")
    assert response.json() == {"endpoint": leader.endpoint, "epoch": epoch}
    assert sent.endpoints() == [follower.endpoint, leader.endpoint]

    tcp_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    rogue_listener = TLSListener(tcp_listener, tls.server_context(), standard_compatible=False)
    trap_listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    rogue = Rogue(f"127.0.0.1:{tcp_listener.extra(SocketAttribute.local_port)}")
    trap = Trap(f"127.0.0.1:{trap_listener.extra(SocketAttribute.local_port)}")
    endpoints = [rogue.endpoint, leader.endpoint, follower.endpoint]
    async with anyio.create_task_group() as servers:
        servers.start_soon(rogue_listener.serve, rogue.handle)
        servers.start_soon(trap_listener.serve, trap.handle)

        # An http:// hint under TLS (a downgrade) is refused; the next endpoint serves.
        rogue.headers = {
            "leader-endpoint": f"http://{trap.endpoint}",
            "leader-epoch": str(epoch + 10),
            "location": f"http://{trap.endpoint}/whoami",
        }
        cache = LeaderCache(endpoints, tls_required=True)
        assert cache.compare_and_set_leader(rogue.endpoint, epoch)  # ask the rogue first
        client, sent = client_for(endpoints, scheme="https", verify=verify, cache=cache)
        response = await client.get("/whoami")
        assert response.json() == {"endpoint": leader.endpoint, "epoch": epoch}
        assert sent.endpoints()[0] == rogue.endpoint
        assert rogue.hits == 1
        assert cache.stats.rejected == {"plaintext_downgrade": 1}
        assert cache.cached_leader == (leader.endpoint, epoch)

        # A redirect at an epoch below the one the client knows is stale: not followed.
        rogue.headers = {
            "leader-endpoint": trap.endpoint,
            "leader-epoch": str(epoch - 1),
            "location": f"https://{trap.endpoint}/whoami",
        }
        cache = LeaderCache(endpoints, tls_required=True)
        assert cache.compare_and_set_leader(rogue.endpoint, epoch)  # it is asked first
        client, sent = client_for(endpoints, scheme="https", verify=verify, cache=cache)
        response = await client.get("/whoami")
        assert response.json() == {"endpoint": leader.endpoint, "epoch": epoch}
        assert rogue.hits == 2
        assert cache.stats.refused == {"epoch_below_cached": 1}
        assert cache.cached_leader == (leader.endpoint, epoch)
        assert trap.endpoint not in sent.endpoints()
        servers.cancel_scope.cancel()
    assert trap.connections == 0  # no request ever went where a bad hint pointed


# --- 5. etcd: a leader frozen past its lease admits nothing when it resumes ----------------

TTL = 2


async def test_a_leader_frozen_past_its_etcd_lease_admits_nothing_when_it_resumes(
    etcd: EtcdServer,
    cluster: Callable[..., HttpCluster],
    client_for: Callable[..., tuple[httpx.AsyncClient, CountingTransport]],
) -> None:
    election = f"e2e-{uuid.uuid4().hex[:10]}"
    nodes = cluster(3, LW_DRIVER_URL=f"etcd://{etcd.endpoint}/{election}?ttl={TTL}")
    frozen = nodes.wait_leader()
    client, sent = client_for(nodes.endpoints, idempotency_keys=True)
    load = Load(client)
    times: dict[str, float] = {}
    probes: list[tuple[float, int]] = []

    async def probe_resumed_node() -> None:
        """Ask the resumed node straight away (no leader-aware client): it must not serve."""
        async with httpx.AsyncClient(timeout=2.0) as direct:
            for _ in range(20):
                response = await direct.post(frozen.url("/tickets"), json={})
                probes.append((time.monotonic(), response.status_code))

    async with anyio.create_task_group() as task_group:
        load.start(task_group, tickets=1, reads=2)
        await until(lambda: len(load.replies) >= 10, within=20, what="traffic")
        times["stop"] = time.monotonic()
        frozen.signal(signal.SIGSTOP)
        await until(
            lambda: len(load.replies) - len(load.served_by(frozen.endpoint)) >= 10,
            within=TTL + 15,
            what="10 replies from a new leader",
        )
        # Frozen for twice the lease's ttl, then resumed.
        await anyio.sleep(max(times["stop"] + 2 * TTL - time.monotonic(), 0))
        times["cont"] = time.monotonic()
        frozen.signal(signal.SIGCONT)
        await probe_resumed_node()
        successor_replies = len(load.replies)
        await until(lambda: len(load.replies) >= successor_replies + 10, within=10, what="more")
        load.stop.set()

    served = load.check()
    successor = served[max(served)]
    assert successor != frozen.endpoint
    # The client rode through: no request took longer than one attempt on the frozen node
    # plus the election (the lease running out on the etcd server, then the campaign).
    slowest = max(reply.finished - reply.started for reply in load.replies)
    assert slowest < POLICY.attempt_timeout + TTL + 1.0, slowest
    # The resumed node admitted nothing: it answered every direct request 503 or 307, and
    # neither those nor the requests that reached it while frozen became served work.
    assert probes
    assert probes[0][0] - times["cont"] < 1.0
    assert {code for _, code in probes} <= {307, 503}, probes
    events = served_events(nodes)
    one_node_per_epoch(events, ("admitted", "request"))
    assert all(e["t0"] < times["stop"] for e in events if e["node"] == frozen.endpoint)
    assert sum(frozen.stats()["refused"].values()) >= len(probes)
    # Its leader-only job was stopped when it resumed, and ran on one node per term.
    jobs = nodes.events()
    one_node_per_epoch(jobs, ("job_start",))
    assert any(
        e["kind"] == "job_stop" and e["node"] == frozen.endpoint and e["t"] >= times["cont"]
        for e in jobs
    )
    # Not ping-ponged: while the followers still named the frozen node, each stream sent it
    # at most one attempt per round of the worklist (each costing attempt_timeout).
    others = [endpoint for endpoint in nodes.endpoints if endpoint != frozen.endpoint]
    first_new = min(r.finished for r in load.replies if r.endpoint != frozen.endpoint)
    sent.assert_not_ping_ponged(frozen.endpoint, others, after=times["stop"], before=first_new)
    assert transport_of(client).cache.stats.refused.get("endpoint_recently_failed", 0) >= 1

"""leaderwatch.httpx: the leader-aware httpx transports against a simulated 3-node cluster.

The cluster speaks the server side's wire contract (DESIGN contract 9): the
leader serves with ``leader-epoch``; a follower answers ``307`` with
``Location``, ``leader-endpoint`` and ``leader-epoch``; a node without a
leader answers ``503`` with ``Retry-After`` and ``leader-retry-after-ms``.
Each node's behaviour is scripted per request. A down node refuses before
anything is sent; every other request goes through ``httpx.MockTransport``.
"""

from __future__ import annotations

import io
import json
import math
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

import leaderwatch.httpx as leader_httpx
from leaderwatch.client import LeaderCache
from leaderwatch.errors import LeaderwatchError
from leaderwatch.httpx import (
    BodyNotReplayable,
    LeaderAwareSyncTransport,
    LeaderAwareTransport,
    LeaderUnavailable,
)
from leaderwatch.retry import (
    ConnectFailed,
    NoLeader,
    Redirected,
    RetryPolicy,
    SentButNoResponse,
    TimedOut,
)

ENDPOINTS = ["a:1", "b:1", "c:1"]
FAST = RetryPolicy(
    deadline=10.0, attempt_timeout=2.0, backoff_initial=0.05, backoff_maximum=0.2, jitter=0.0
)


# --- the simulated cluster ------------------------------------------------------------------


@dataclass(frozen=True)
class Lead:
    epoch: int


@dataclass(frozen=True)
class Points:
    leader: str  # as sent on the wire (may carry a scheme)
    epoch: int | None


@dataclass(frozen=True)
class Electing:
    retry_after_ms: int | str | None = 50
    epoch: int | None = None
    retry_after_s: int | None = 1


@dataclass(frozen=True)
class Down:
    pass


@dataclass(frozen=True)
class Frozen:
    pass


@dataclass(frozen=True)
class Drops:
    """Reads the whole request, then the connection breaks."""


@dataclass(frozen=True)
class CutsBody:
    """Answers 200 at ``epoch``, then the connection breaks before the body's 40 bytes."""

    epoch: int


class _CutStream(httpx.AsyncByteStream, httpx.SyncByteStream):
    async def __aiter__(self) -> Any:
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")
        yield b""  # pragma: no cover

    def __iter__(self) -> Any:
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")
        yield b""  # pragma: no cover


@dataclass(frozen=True)
class StallsBody:
    """Answers 200 at ``epoch``, then never sends the body's 40 bytes (a node frozen mid-reply)."""

    epoch: int


class _StalledStream(httpx.AsyncByteStream):
    async def __aiter__(self) -> Any:
        await anyio.sleep_forever()
        yield b""  # pragma: no cover


@dataclass(frozen=True)
class Plain:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


Behaviour = Lead | Points | Electing | Down | Frozen | Drops | CutsBody | StallsBody | Plain


@dataclass
class Received:
    endpoint: str
    method: str
    target: str
    body: bytes
    headers: httpx.Headers
    url: httpx.URL
    timeouts: dict[str, Any]


class Cluster:
    """Three nodes; ``script[endpoint]`` is consumed one behaviour per request, the last repeats."""

    def __init__(self, **script: Behaviour | list[Behaviour]) -> None:
        self.script: dict[str, list[Behaviour]] = {
            endpoint: list(behaviour) if isinstance(behaviour, list) else [behaviour]
            for endpoint, behaviour in ((k.replace("_", ":"), v) for k, v in script.items())
        }
        self.received: list[Received] = []
        self.refused: list[str] = []
        self.closed = False

    def next_behaviour(self, endpoint: str) -> Behaviour:
        queue = self.script[endpoint]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def respond(self, request: httpx.Request, behaviour: Behaviour) -> httpx.Response:
        endpoint = request.url.netloc.decode("ascii")
        self.received.append(
            Received(
                endpoint,
                request.method,
                request.url.raw_path.decode("ascii"),
                request.content,
                request.headers,
                request.url,
                request.extensions.get("timeout", {}),
            )
        )
        raw_target = request.url.raw_path.decode("ascii")
        match behaviour:
            case Lead(epoch=epoch):
                return httpx.Response(
                    200,
                    headers={"leader-epoch": str(epoch)},
                    json={"node": endpoint, "method": request.method, "target": raw_target},
                )
            case Points(leader=leader, epoch=epoch):
                headers = {"leader-endpoint": leader, "location": f"http://{leader}{raw_target}"}
                if epoch is not None:
                    headers["leader-epoch"] = str(epoch)
                return httpx.Response(
                    307,
                    headers=headers,
                    json={"leader_endpoint": leader, "leader_epoch": epoch},
                )
            case Electing(retry_after_ms=ms, epoch=epoch, retry_after_s=seconds):
                headers = {}
                if ms is not None:
                    headers["leader-retry-after-ms"] = str(ms)
                if seconds is not None:
                    headers["retry-after"] = str(seconds)
                if epoch is not None:
                    headers["leader-epoch"] = str(epoch)
                return httpx.Response(503, headers=headers, json={"leader_epoch": epoch})
            case Drops():
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            case CutsBody(epoch=epoch):
                return httpx.Response(
                    200,
                    headers={"leader-epoch": str(epoch), "content-length": "40"},
                    stream=_CutStream(),
                )
            case StallsBody(epoch=epoch):
                return httpx.Response(
                    200,
                    headers={"leader-epoch": str(epoch), "content-length": "40"},
                    stream=_StalledStream(),
                )
            case Plain(status=status, headers=headers):
                return httpx.Response(status, headers=headers, text="plain")
        raise AssertionError(f"unexpected behaviour {behaviour}")

    def inner(self) -> ClusterTransport:
        return ClusterTransport(self)

    def endpoints_received(self) -> list[str]:
        return [r.endpoint for r in self.received]


class ClusterTransport(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """Refuses for a down node before sending; hangs for a frozen one; else MockTransport."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.behaviour: Behaviour | None = None
        self.mock = httpx.MockTransport(self._handler)

    def _handler(self, request: httpx.Request) -> httpx.Response:
        assert self.behaviour is not None
        return self.cluster.respond(request, self.behaviour)

    def _refuse(self, request: httpx.Request) -> None:
        endpoint = request.url.netloc.decode("ascii")
        self.behaviour = self.cluster.next_behaviour(endpoint)
        if isinstance(self.behaviour, Down):
            self.cluster.refused.append(endpoint)
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._refuse(request)
        if isinstance(self.behaviour, Frozen):
            self.cluster.received.append(
                Received(
                    request.url.netloc.decode("ascii"), request.method, "", b"",
                    request.headers, request.url, request.extensions.get("timeout", {}),
                )
            )  # fmt: skip
            await anyio.sleep_forever()
        return await self.mock.handle_async_request(request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._refuse(request)
        if isinstance(self.behaviour, Frozen):
            # A blocking client cannot be cancelled: a frozen node ends in the socket's
            # read timeout, which the transport capped at the attempt's time.
            timeouts = request.extensions["timeout"]
            self.cluster.received.append(
                Received(
                    request.url.netloc.decode("ascii"), request.method, "", b"",
                    request.headers, request.url, timeouts,
                )
            )  # fmt: skip
            raise httpx.ReadTimeout("timed out", request=request)
        return self.mock.handle_request(request)

    async def aclose(self) -> None:
        self.cluster.closed = True

    def close(self) -> None:
        self.cluster.closed = True


class Clock:
    """A fake clock that the fake sleeps advance."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()

    def sleep_sync(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def seed_starting_at(first: str, endpoints: list[str] = ENDPOINTS) -> int:
    """An rng seed whose first worklist starts at ``first``."""
    for seed in range(100):
        if random.Random(seed).randrange(len(endpoints)) == endpoints.index(first):
            return seed
    raise AssertionError("no seed")


def make_async(
    cluster: Cluster,
    *,
    first: str = "a:1",
    policy: RetryPolicy = FAST,
    scheme: str = "http",
    idempotency_keys: bool = False,
    clock: Clock | None = None,
) -> tuple[LeaderAwareTransport, Clock]:
    clock = Clock() if clock is None else clock
    cache = LeaderCache(
        ENDPOINTS,
        tls_required=scheme == "https",
        clock=clock,
        rng=random.Random(seed_starting_at(first)),
    )
    transport = LeaderAwareTransport(
        ENDPOINTS,
        scheme=scheme,  # type: ignore[arg-type]
        cache=cache,
        policy=policy,
        inner=cluster.inner(),
        idempotency_keys=idempotency_keys,
        clock=clock,
        sleep=clock.sleep,
        rng=random.Random(0),
    )
    return transport, clock


def make_sync(
    cluster: Cluster,
    *,
    first: str = "a:1",
    policy: RetryPolicy = FAST,
    scheme: str = "http",
    idempotency_keys: bool = False,
) -> tuple[LeaderAwareSyncTransport, Clock]:
    clock = Clock()
    cache = LeaderCache(
        ENDPOINTS,
        tls_required=scheme == "https",
        clock=clock,
        rng=random.Random(seed_starting_at(first)),
    )
    transport = LeaderAwareSyncTransport(
        ENDPOINTS,
        scheme=scheme,  # type: ignore[arg-type]
        cache=cache,
        policy=policy,
        inner=cluster.inner(),
        idempotency_keys=idempotency_keys,
        clock=clock,
        sleep=clock.sleep_sync,
        rng=random.Random(0),
    )
    return transport, clock


def client(transport: LeaderAwareTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport, base_url="http://cluster")


def sync_client(transport: LeaderAwareSyncTransport) -> httpx.Client:
    return httpx.Client(transport=transport, base_url="http://cluster")


pytestmark = pytest.mark.anyio


# --- the request reaches the leader intact --------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_a_request_to_a_follower_lands_on_the_leader_intact(method: str) -> None:
    cluster = Cluster(a_1=Points("b:1", 5), b_1=Lead(5), c_1=Points("b:1", 5))
    transport, _ = make_async(cluster, first="a:1")
    body = b'{"amount": 7, "note": "caf\xc3\xa9"}' if method not in ("GET", "DELETE") else b""
    async with client(transport) as http:
        response = await http.request(
            method,
            "/tickets/42",
            params={"q": "a b", "tag": ["x", "y"]},
            content=body,
            headers={"x-trace": "t-1"},
        )
    assert response.status_code == 200
    assert response.extensions["leaderwatch.endpoint"] == "b:1"
    follower, leader = cluster.received
    assert (follower.endpoint, leader.endpoint) == ("a:1", "b:1")
    for seen in (follower, leader):
        assert seen.method == method
        assert seen.target == "/tickets/42?q=a+b&tag=x&tag=y"
        assert seen.body == body
        assert seen.headers["x-trace"] == "t-1"
    assert leader.headers["host"] == "b:1"
    assert leader.url == httpx.URL("http://b:1/tickets/42?q=a+b&tag=x&tag=y")
    assert transport.cache.cached_leader == ("b:1", 5)


async def test_the_next_request_goes_straight_to_the_leader() -> None:
    cluster = Cluster(a_1=Points("b:1", 5), b_1=Lead(5), c_1=Points("b:1", 5))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        await http.get("/x")
        cluster.received.clear()
        for _ in range(3):
            assert (await http.get("/x")).json()["node"] == "b:1"
    assert cluster.endpoints_received() == ["b:1"] * 3


async def test_served_epoch_goes_to_the_cache_and_an_absent_or_bad_one_does_not() -> None:
    # With nothing cached, successive requests start one further along the worklist.
    cluster = Cluster(a_1=Plain(200), b_1=Plain(200, {"leader-epoch": "x7"}), c_1=Lead(8))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        await http.get("/")
        assert transport.cache.cached_leader is None
        await http.get("/")
        assert transport.cache.cached_leader is None
        await http.get("/")
    assert transport.cache.cached_leader == ("c:1", 8)


async def test_a_caller_set_host_header_is_kept() -> None:
    cluster = Cluster(a_1=Lead(1), b_1=Lead(1), c_1=Lead(1))
    transport, _ = make_async(cluster)
    async with client(transport) as http:
        await http.get("/", headers={"Host": "api.example"})
    assert cluster.received[0].headers["host"] == "api.example"


# --- redirects the cache must not follow ----------------------------------------------------


async def test_a_stale_epoch_redirect_is_not_followed() -> None:
    cluster = Cluster(
        a_1=[Lead(7), Electing(retry_after_ms=20), Lead(7)],
        b_1=Points("c:1", 3),  # an old view: c led at epoch 3
        c_1=Points("a:1", 7),
    )
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        await http.get("/")  # the cache learns a:1 at 7
        cluster.received.clear()
        response = await http.get("/")
    assert response.json()["node"] == "a:1"
    # a:1 had no leader yet; b:1's stale hint to c:1 was not followed (c:1 was only
    # reached as the next in the round, and pointed back to a:1 at 7).
    assert cluster.endpoints_received() == ["a:1", "b:1", "c:1", "a:1"]
    assert transport.cache.cached_leader == ("a:1", 7)
    assert transport.cache.stats.refused == {"epoch_below_cached": 1}


async def test_an_http_hint_under_https_is_refused() -> None:
    cluster = Cluster(a_1=Points("http://c:1", 9), b_1=Lead(9), c_1=Lead(9))
    transport, _ = make_async(cluster, first="a:1", scheme="https")
    async with client(transport) as http:
        response = await http.get("/x")
    assert response.json()["node"] == "b:1"  # the next in the round, not the hint
    assert cluster.endpoints_received() == ["a:1", "b:1"]
    assert all(r.url.scheme == "https" for r in cluster.received)
    assert transport.cache.stats.rejected == {"plaintext_downgrade": 1}


async def test_an_https_hint_under_https_is_followed() -> None:
    cluster = Cluster(a_1=Points("https://c:1", 9), b_1=Lead(9), c_1=Lead(9))
    transport, _ = make_async(cluster, first="a:1", scheme="https")
    async with client(transport) as http:
        response = await http.get("/x")
    assert response.json()["node"] == "c:1"


async def test_a_307_without_hint_headers_is_returned_as_is() -> None:
    cluster = Cluster(a_1=Plain(307, {"location": "http://elsewhere/x"}), b_1=Lead(1), c_1=Lead(1))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        response = await http.post("/x", content=b"body")
    assert response.status_code == 307
    assert response.headers["location"] == "http://elsewhere/x"
    assert cluster.endpoints_received() == ["a:1"]


async def test_a_redirect_loop_stops_at_max_redirects() -> None:
    cluster = Cluster(a_1=Points("b:1", 4), b_1=Points("a:1", 4), c_1=Points("a:1", 4))
    policy = FAST.model_copy(update={"max_redirects": 3})
    transport, _ = make_async(cluster, first="a:1", policy=policy)
    async with client(transport) as http:
        with pytest.raises(LeaderUnavailable) as caught:
            await http.get("/")
    assert caught.value.reason == "max_redirects_exceeded"
    assert cluster.endpoints_received() == ["a:1", "b:1", "a:1", "b:1"]


# --- no leader yet --------------------------------------------------------------------------


async def test_503_with_retry_after_ms_is_honoured() -> None:
    electing = Electing(retry_after_ms=400, epoch=4)
    cluster = Cluster(
        a_1=[electing, Lead(5)],
        b_1=[electing, Points("a:1", 5)],
        c_1=[electing, Points("a:1", 5)],
    )
    transport, clock = make_async(cluster, first="a:1")
    async with client(transport) as http:
        response = await http.post("/x", content=b"once")
    assert response.json()["node"] == "a:1"
    # A new round starts one further along the worklist: b:1 now knows the leader.
    assert cluster.endpoints_received() == ["a:1", "b:1", "c:1", "b:1", "a:1"]
    assert clock.slept == [0.4, 0.4, 0.4]  # the server's 400 ms, longer than the backoff


async def test_503_falls_back_to_retry_after_seconds() -> None:
    cluster = Cluster(a_1=[Electing(retry_after_ms="soon", retry_after_s=2), Lead(1)], b_1=Lead(1))
    transport, clock = make_async(cluster, first="a:1")
    async with client(transport) as http:
        await http.get("/")
    assert clock.slept == [2.0]


async def test_a_503_without_leaderwatch_headers_is_returned_as_is() -> None:
    cluster = Cluster(a_1=Plain(503, {"retry-after": "1"}), b_1=Lead(1), c_1=Lead(1))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        response = await http.get("/")
    assert response.status_code == 503
    assert cluster.endpoints_received() == ["a:1"]


async def test_giving_up_says_what_each_attempt_got() -> None:
    cluster = Cluster(
        a_1=Down(), b_1=Electing(retry_after_ms=300, epoch=2), c_1=Points("http://a:1", 3)
    )
    policy = FAST.model_copy(update={"deadline": 1.0})
    transport, _ = make_async(cluster, first="a:1", policy=policy, scheme="https")
    async with client(transport) as http:
        with pytest.raises(httpx.TransportError) as caught:
            await http.get("/status")
    error = caught.value
    assert isinstance(error, LeaderUnavailable)
    assert isinstance(error, LeaderwatchError)
    assert error.reason == "deadline_exceeded"
    assert error.request.url.path == "/status"
    kinds = [type(record.outcome) for record in error.attempts]
    assert kinds[:3] == [ConnectFailed, NoLeader, Redirected]
    assert [r.endpoint for r in error.attempts[:3]] == ["a:1", "b:1", "c:1"]
    message = str(error)
    assert "deadline of 1 s" in message
    assert "#1 a:1: connection failed (ConnectError: [Errno 111] Connection refused)" in message
    assert "#2 b:1: no leader yet (epoch 2), retry after 0.3 s" in message
    assert "not followed: plaintext_downgrade" in message


# --- dead and frozen nodes ------------------------------------------------------------------


async def test_a_dead_leader_is_not_ping_ponged() -> None:
    cluster = Cluster(
        a_1=[Lead(5), Down()],
        b_1=[Points("a:1", 5), Points("a:1", 5), Points("c:1", 6)],
        c_1=[Points("a:1", 5), Lead(6)],
    )
    transport, clock = make_async(cluster, first="a:1")
    async with client(transport) as http:
        await http.get("/")  # a:1 leads at 5
        cluster.received.clear()
        response = await http.get("/")  # a:1 died; b:1 and c:1 still name it
    assert response.json()["node"] == "c:1"
    assert cluster.refused == ["a:1"]  # tried once, never followed back to
    assert "a:1" not in cluster.endpoints_received()
    assert transport.cache.cached_leader == ("c:1", 6)
    stats = transport.cache.stats
    assert stats.failures == 1
    assert stats.refused["endpoint_recently_failed"] >= 2
    assert len(clock.slept) == 1  # one backoff between rounds


async def test_a_graceful_drain_does_not_use_up_the_redirect_budget() -> None:
    # a:1 drains (503 at its epoch) while b:1 and c:1 still name it; then b:1 takes over.
    cluster = Cluster(
        a_1=[Lead(5), *[Electing(epoch=5)] * 4, Points("b:1", 6)],
        b_1=[*[Points("a:1", 5)] * 3, Lead(6)],
        c_1=[*[Points("a:1", 5)] * 3, Points("b:1", 6)],
    )
    policy = FAST.model_copy(update={"max_redirects": 2})
    transport, _ = make_async(cluster, first="a:1", policy=policy)
    async with client(transport) as http:
        await http.get("/")  # a:1 leads at 5
        cluster.received.clear()
        response = await http.post("/tickets", content=b"x")  # ... and now drains
    # Each follower's hint back to the draining leader counted as "no leader yet", not as a
    # redirect: with max_redirects=2 the request would otherwise have given up after two.
    assert (response.status_code, response.json()["node"]) == (200, "b:1")
    assert response.headers["leader-epoch"] == "6"
    received = cluster.endpoints_received()
    assert received.count("a:1") == 4
    assert received.count("b:1") + received.count("c:1") >= 6
    assert transport.cache.cached_leader == ("b:1", 6)
    assert transport.cache.stats.gave_up == {}


async def test_a_frozen_node_costs_one_attempt() -> None:
    cluster = Cluster(a_1=Frozen(), b_1=Lead(3), c_1=Lead(3))
    policy = FAST.model_copy(update={"attempt_timeout": 0.2})
    transport, _ = make_async(cluster, first="a:1", policy=policy)
    started = time.monotonic()
    async with client(transport) as http:
        response = await http.get("/")
    elapsed = time.monotonic() - started
    assert response.json()["node"] == "b:1"
    assert cluster.endpoints_received() == ["a:1", "b:1"]
    assert 0.2 <= elapsed < 1.5
    assert transport.cache.stats.failures == 1


async def test_a_frozen_node_does_not_get_a_post_twice() -> None:
    cluster = Cluster(a_1=Frozen(), b_1=Lead(3), c_1=Lead(3))
    policy = FAST.model_copy(update={"attempt_timeout": 0.1})
    transport, _ = make_async(cluster, first="a:1", policy=policy)
    async with client(transport) as http:
        with pytest.raises(LeaderUnavailable, match="Idempotency-Key") as caught:
            await http.post("/tickets", content=b"one ticket")
    assert caught.value.reason == "outcome_unknown"
    (record,) = caught.value.attempts
    assert record.outcome == TimedOut(sent=True, error=record.outcome.error)  # type: ignore[union-attr]
    assert cluster.endpoints_received() == ["a:1"]


# --- duplicates: sent but no response -------------------------------------------------------


async def test_a_post_sent_then_dropped_is_not_retried_without_an_idempotency_key() -> None:
    cluster = Cluster(a_1=Drops(), b_1=Lead(6), c_1=Lead(6))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        with pytest.raises(LeaderUnavailable) as caught:
            await http.post("/tickets", json={"n": 1})
    error = caught.value
    assert error.reason == "outcome_unknown"
    message = str(error)
    assert "may have reached a:1" in message
    assert "POST is not idempotent" in message
    assert "Idempotency-Key" in message
    assert "idempotency_keys=True" in message
    assert [type(r.outcome) for r in error.attempts] == [SentButNoResponse]
    assert cluster.endpoints_received() == ["a:1"]  # never sent twice


async def test_a_post_sent_then_dropped_is_retried_with_one_key() -> None:
    cluster = Cluster(a_1=Drops(), b_1=Lead(6), c_1=Lead(6))
    transport, _ = make_async(cluster, first="a:1", idempotency_keys=True)
    async with client(transport) as http:
        response = await http.post("/tickets", json={"n": 1})
        other = await http.post("/tickets", json={"n": 2})
    assert response.json()["node"] == "b:1"
    first, second, third = cluster.received
    key = first.headers["idempotency-key"]
    assert key
    assert second.headers["idempotency-key"] == key
    assert second.body == first.body == b'{"n":1}'
    assert third.headers["idempotency-key"] != key  # one key per logical request
    assert response.request.headers["idempotency-key"] == key
    assert other.status_code == 200


async def test_a_reply_cut_mid_body_is_a_lost_response_not_an_error_to_the_caller() -> None:
    # The node died after its reply's head: a GET moves on to the next node; a POST
    # without a key is never re-sent (its outcome is unknown); with a key it is.
    cluster = Cluster(a_1=CutsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        response = await http.get("/tickets/1")
        assert response.json()["node"] == "b:1"
        assert transport.cache.cached_leader is not None
        assert transport.cache.cached_leader.epoch == 7  # the cut reply's epoch never counted
    cluster = Cluster(a_1=CutsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        with pytest.raises(LeaderUnavailable) as caught:
            await http.post("/tickets", json={"n": 1})
    assert caught.value.reason == "outcome_unknown"
    assert cluster.endpoints_received() == ["a:1"]
    cluster = Cluster(a_1=CutsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_async(cluster, first="a:1", idempotency_keys=True)
    async with client(transport) as http:
        assert (await http.post("/tickets", json={"n": 1})).json()["node"] == "b:1"


async def test_a_reply_frozen_mid_body_costs_one_attempt_and_a_post_is_not_sent_twice() -> None:
    # Head and body share the attempt's time: a GET moves on after one attempt_timeout;
    # a POST without a key is not re-sent (it reached the node).
    policy = FAST.model_copy(update={"attempt_timeout": 0.2})
    cluster = Cluster(a_1=StallsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_async(cluster, first="a:1", policy=policy)
    started = time.monotonic()
    async with client(transport) as http:
        response = await http.get("/tickets/1")
    assert 0.2 <= time.monotonic() - started < 1.5
    assert response.json()["node"] == "b:1"
    assert transport.cache.cached_leader == ("b:1", 7)  # the frozen reply's epoch never counted
    cluster = Cluster(a_1=StallsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_async(cluster, first="a:1", policy=policy)
    async with client(transport) as http:
        with pytest.raises(LeaderUnavailable) as caught:
            await http.post("/tickets", json={"n": 1})
    assert caught.value.reason == "outcome_unknown"
    (record,) = caught.value.attempts
    assert record.outcome == TimedOut(  # type: ignore[union-attr]
        sent=True, error="reply body not complete within 0.200 s"
    )
    assert cluster.endpoints_received() == ["a:1"]


def test_sync_a_reply_cut_mid_body_is_retried_when_safe() -> None:
    cluster = Cluster(a_1=CutsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_sync(cluster, first="a:1")
    with sync_client(transport) as http:
        assert http.get("/tickets/1").json()["node"] == "b:1"
    cluster = Cluster(a_1=CutsBody(6), b_1=Lead(7), c_1=Lead(7))
    transport, _ = make_sync(cluster, first="a:1")
    with sync_client(transport) as http, pytest.raises(LeaderUnavailable, match="not idempotent"):
        http.post("/tickets", content=b"x")
    assert cluster.endpoints_received() == ["a:1"]


async def test_a_callers_idempotency_key_is_kept_and_allows_retries() -> None:
    cluster = Cluster(a_1=Drops(), b_1=Lead(6), c_1=Lead(6))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        await http.patch("/t/1", content=b"x", headers={"Idempotency-Key": "order-77"})
    assert [r.headers["idempotency-key"] for r in cluster.received] == ["order-77"] * 2


async def test_idempotent_methods_get_no_key_and_are_retried() -> None:
    cluster = Cluster(a_1=Drops(), b_1=Lead(6), c_1=Lead(6))
    transport, _ = make_async(cluster, first="a:1", idempotency_keys=True)
    async with client(transport) as http:
        response = await http.put("/t/1", content=b"x")
    assert response.status_code == 200
    assert all("idempotency-key" not in r.headers for r in cluster.received)


# --- request bodies -------------------------------------------------------------------------


async def test_a_streaming_body_is_not_sent_twice() -> None:
    cluster = Cluster(a_1=Points("b:1", 2), b_1=Lead(2), c_1=Lead(2))
    transport, _ = make_async(cluster, first="a:1")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"part-1;"
        yield b"part-2"

    async with client(transport) as http:
        with pytest.raises(BodyNotReplayable, match=r"request\.read") as caught:
            await http.post("/upload", content=chunks())
    assert isinstance(caught.value, LeaderwatchError)
    assert isinstance(caught.value, httpx.StreamError)
    assert [r.decision for r in caught.value.attempts] == ["followed"]
    assert cluster.endpoints_received() == ["a:1"]
    assert cluster.received[0].body == b"part-1;part-2"


async def test_a_streaming_body_survives_a_refused_connection() -> None:
    cluster = Cluster(a_1=Down(), b_1=Lead(2), c_1=Lead(2))
    transport, _ = make_async(cluster, first="a:1")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"all of it"

    async with client(transport) as http:
        response = await http.post("/upload", content=chunks())
    assert response.status_code == 200
    assert [(r.endpoint, r.body) for r in cluster.received] == [("b:1", b"all of it")]


async def test_a_seekable_multipart_upload_is_replayed() -> None:
    cluster = Cluster(a_1=Points("b:1", 2), b_1=Lead(2), c_1=Lead(2))
    transport, _ = make_async(cluster, first="a:1")
    async with client(transport) as http:
        response = await http.post(
            "/upload", data={"k": "v"}, files={"f": ("f.txt", io.BytesIO(b"file body"))}
        )
    assert response.status_code == 200
    follower, leader = cluster.received
    assert b"file body" in leader.body
    assert leader.body == follower.body


# --- timeouts, lifecycle, construction ------------------------------------------------------


async def test_attempt_timeouts_cap_the_callers_and_the_read_timeout_is_restored() -> None:
    cluster = Cluster(a_1=Lead(1), b_1=Lead(1), c_1=Lead(1))
    policy = FAST.model_copy(update={"attempt_timeout": 1.0})
    transport, _ = make_async(cluster, policy=policy)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://cluster", timeout=httpx.Timeout(30.0, connect=0.5)
    ) as http:
        await http.get("/")
    timeouts = cluster.received[0].timeouts
    assert timeouts["connect"] == 0.5
    assert timeouts["write"] == pytest.approx(0.9)
    assert timeouts["pool"] == 30.0
    assert timeouts["read"] == 30.0  # restored for reading the body, once the head arrived


async def test_closing_the_transport_closes_the_inner_one() -> None:
    cluster = Cluster(a_1=Lead(1), b_1=Lead(1), c_1=Lead(1))
    transport, _ = make_async(cluster)
    async with client(transport):
        pass
    assert cluster.closed


def test_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="scheme"):
        LeaderAwareTransport(ENDPOINTS, scheme="ftp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tls_required=True"):
        LeaderAwareTransport(ENDPOINTS, scheme="https", cache=LeaderCache(ENDPOINTS))
    with pytest.raises(ValueError, match="differ"):
        LeaderAwareSyncTransport(["a:1"], cache=LeaderCache(ENDPOINTS))
    with pytest.raises(TypeError, match="RetryPolicy"):
        LeaderAwareTransport(ENDPOINTS, policy={"deadline": 1})  # type: ignore[arg-type]
    transport = LeaderAwareTransport(ENDPOINTS, scheme="https")
    assert transport.cache.tls_required
    assert transport.policy == RetryPolicy()


def test_httpx_inside_the_module_is_the_real_httpx() -> None:
    assert leader_httpx.httpx is httpx
    assert Path(httpx.__file__).parent.name == "httpx"
    assert "leaderwatch" not in Path(httpx.__file__).parts


def test_importing_without_httpx_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n    import leaderwatch.httpx\n"
        "except ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'leaderwatch[http]'" in result.stdout


# --- the blocking transport: same plan, same rules ------------------------------------------


def test_sync_a_request_to_a_follower_lands_on_the_leader_intact() -> None:
    cluster = Cluster(a_1=Points("b:1", 5), b_1=Lead(5), c_1=Points("b:1", 5))
    transport, _ = make_sync(cluster, first="a:1")
    with sync_client(transport) as http:
        response = http.post("/tickets?x=1", json={"n": 1})
    assert response.json() == {"node": "b:1", "method": "POST", "target": "/tickets?x=1"}
    assert [(r.endpoint, r.body) for r in cluster.received] == [
        ("a:1", b'{"n":1}'),
        ("b:1", b'{"n":1}'),
    ]
    assert transport.cache.cached_leader == ("b:1", 5)
    assert cluster.closed


def test_sync_a_dead_leader_is_not_ping_ponged() -> None:
    cluster = Cluster(
        a_1=[Lead(5), Down()],
        b_1=[Points("a:1", 5), Points("a:1", 5), Points("c:1", 6)],
        c_1=[Points("a:1", 5), Lead(6)],
    )
    transport, clock = make_sync(cluster, first="a:1")
    with sync_client(transport) as http:
        http.get("/")
        response = http.get("/")
    assert response.json()["node"] == "c:1"
    assert cluster.refused == ["a:1"]
    assert len(clock.slept) == 1


def test_sync_503_and_give_up() -> None:
    cluster = Cluster(a_1=Electing(250), b_1=Electing(250), c_1=Electing(250))
    transport, clock = make_sync(cluster, policy=FAST.model_copy(update={"deadline": 1.0}))
    with sync_client(transport) as http, pytest.raises(LeaderUnavailable) as caught:
        http.get("/")
    assert caught.value.reason == "deadline_exceeded"
    assert clock.slept == [0.25, 0.25, 0.25]
    assert len(caught.value.attempts) == 4


def test_sync_a_frozen_node_costs_one_attempt() -> None:
    cluster = Cluster(a_1=Frozen(), b_1=Lead(3), c_1=Lead(3))
    policy = FAST.model_copy(update={"attempt_timeout": 0.3})
    transport, _ = make_sync(cluster, first="a:1", policy=policy)
    with sync_client(transport) as http:
        response = http.get("/")
    assert response.json()["node"] == "b:1"
    frozen = cluster.received[0]
    assert frozen.timeouts["read"] == pytest.approx(0.3)
    assert frozen.timeouts["connect"] == pytest.approx(0.3)


def test_sync_an_infinite_attempt_timeout_leaves_the_callers_timeouts() -> None:
    cluster = Cluster(a_1=Lead(1), b_1=Lead(1), c_1=Lead(1))
    policy = RetryPolicy(deadline=math.inf, attempt_timeout=math.inf)
    transport, _ = make_sync(cluster, policy=policy)
    with httpx.Client(transport=transport, base_url="http://cluster", timeout=7.0) as http:
        http.get("/")
    assert cluster.received[0].timeouts == {"connect": 7.0, "read": 7.0, "write": 7.0, "pool": 7.0}


def test_sync_a_post_sent_then_dropped() -> None:
    cluster = Cluster(a_1=Drops(), b_1=Lead(6), c_1=Lead(6))
    transport, _ = make_sync(cluster, first="a:1")
    with sync_client(transport) as http, pytest.raises(LeaderUnavailable, match="not idempotent"):
        http.post("/tickets", content=b"x")
    assert cluster.endpoints_received() == ["a:1"]

    cluster = Cluster(a_1=Drops(), b_1=Lead(6), c_1=Lead(6))
    transport, _ = make_sync(cluster, first="a:1", idempotency_keys=True)
    with sync_client(transport) as http:
        assert http.post("/tickets", content=b"x").status_code == 200
    keys = {r.headers["idempotency-key"] for r in cluster.received}
    assert len(keys) == 1
    assert cluster.endpoints_received() == ["a:1", "b:1"]


def test_sync_a_streaming_body_is_not_sent_twice() -> None:
    cluster = Cluster(a_1=Points("b:1", 2), b_1=Lead(2), c_1=Lead(2))
    transport, _ = make_sync(cluster, first="a:1")

    def chunks() -> Iterator[bytes]:
        yield b"only once"

    with sync_client(transport) as http, pytest.raises(BodyNotReplayable):
        http.post("/upload", content=chunks())
    assert cluster.endpoints_received() == ["a:1"]


def test_sync_an_http_hint_under_https_is_refused() -> None:
    cluster = Cluster(a_1=Points("http://c:1", 9), b_1=Lead(9), c_1=Lead(9))
    transport, _ = make_sync(cluster, first="a:1", scheme="https")
    with sync_client(transport) as http:
        assert http.get("/").json()["node"] == "b:1"
    assert transport.cache.stats.rejected == {"plaintext_downgrade": 1}


def test_sync_the_transport_is_shared_by_threads() -> None:
    cluster = Cluster(a_1=Points("b:1", 5), b_1=Lead(5), c_1=Points("b:1", 5))
    transport, _ = make_sync(cluster, first="a:1")
    http = sync_client(transport)
    results: list[str] = []

    def work() -> None:
        for _ in range(20):
            results.append(http.get("/").json()["node"])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    http.close()
    assert results == ["b:1"] * 80


# --- real servers on loopback (uvicorn), real httpx transports ------------------------------


def wire_app(role: dict[str, Any]) -> Any:
    """An ASGI app speaking the wire contract; ``role`` says what it is right now."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"].decode() + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        headers: list[tuple[bytes, bytes]]
        if role["kind"] == "leader":
            status = 200
            headers = [(b"leader-epoch", str(role["epoch"]).encode())]
            host = dict(scope["headers"])[b"host"].decode()
            payload = {
                "method": scope["method"],
                "target": target,
                "body": body.decode(),
                "host": host,
            }
        else:
            status = 307
            leader = role["leader"]
            headers = [
                (b"location", f"http://{leader}{target}".encode()),
                (b"leader-endpoint", leader.encode()),
                (b"leader-epoch", str(role["epoch"]).encode()),
            ]
            payload = {"leader_endpoint": leader, "leader_epoch": role["epoch"]}
        content = json.dumps(payload).encode()
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(content)),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app


@dataclass
class Loopback:
    leader: str
    follower: str
    refusing: str  # nothing listens there
    frozen: str  # accepts connections (kernel backlog), never answers


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def _endpoint(sock: socket.socket) -> str:
    return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    leader_sock, follower_sock, frozen_sock = (_listening_socket() for _ in range(3))
    leader = _endpoint(leader_sock)
    probe = _listening_socket()
    refusing = _endpoint(probe)
    probe.close()
    roles = [{"kind": "leader", "epoch": 12}, {"kind": "follower", "leader": leader, "epoch": 12}]
    servers = []
    threads = []
    for sock, role in zip((leader_sock, follower_sock), roles, strict=True):
        config = uvicorn.Config(wire_app(role), lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
    try:
        deadline = time.monotonic() + 10
        while not all(server.started for server in servers):
            if time.monotonic() > deadline or not all(t.is_alive() for t in threads):
                pytest.fail("uvicorn did not start on loopback within 10 s")
            time.sleep(0.01)
        yield Loopback(leader, _endpoint(follower_sock), refusing, _endpoint(frozen_sock))
    finally:
        for server in servers:
            server.should_exit = True
        for thread in threads:
            thread.join(10)
        for sock in (leader_sock, follower_sock, frozen_sock):
            sock.close()


def _loopback_cache(loopback: Loopback, first: str) -> tuple[list[str], LeaderCache]:
    endpoints = [loopback.follower, loopback.refusing, loopback.frozen, loopback.leader]
    rng = random.Random(seed_starting_at(first, endpoints))
    return endpoints, LeaderCache(endpoints, rng=rng)


async def test_loopback_follower_to_leader_over_real_http(loopback: Loopback) -> None:
    endpoints, cache = _loopback_cache(loopback, loopback.follower)
    transport = LeaderAwareTransport(endpoints, cache=cache)
    async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as http:
        response = await http.post("/tickets/9?x=1&y=%C3%A9", content=b"body bytes")
        again = await http.get("/again")
    assert response.json() == {
        "method": "POST",
        "target": "/tickets/9?x=1&y=%C3%A9",
        "body": "body bytes",
        "host": loopback.leader,
    }
    assert response.extensions["leaderwatch.endpoint"] == loopback.leader
    assert again.extensions["leaderwatch.endpoint"] == loopback.leader
    assert cache.cached_leader == (loopback.leader, 12)


async def test_loopback_refused_and_frozen_nodes_cost_one_attempt_each(
    loopback: Loopback,
) -> None:
    endpoints, cache = _loopback_cache(loopback, loopback.refusing)
    policy = RetryPolicy(attempt_timeout=0.3, deadline=5.0)
    transport = LeaderAwareTransport(endpoints, cache=cache, policy=policy)
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as http:
        response = await http.get("/x")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed < 2.0  # one attempt_timeout for the frozen node, not the deadline
    assert cache.stats.failures == 2  # refused, then timed out: both demoted
    assert cache.cached_leader == (loopback.leader, 12)


def test_loopback_sync_transport(loopback: Loopback) -> None:
    endpoints, cache = _loopback_cache(loopback, loopback.refusing)
    policy = RetryPolicy(attempt_timeout=0.3, deadline=5.0)
    transport = LeaderAwareSyncTransport(endpoints, cache=cache, policy=policy)
    with httpx.Client(transport=transport, base_url="http://cluster") as http:
        response = http.put("/k?v=1", content=b"v")
    assert response.json()["target"] == "/k?v=1"
    assert response.json()["body"] == "v"
    assert cache.stats.failures == 2


async def test_loopback_frozen_node_and_a_post_is_not_sent_twice(loopback: Loopback) -> None:
    endpoints, cache = _loopback_cache(loopback, loopback.frozen)
    policy = RetryPolicy(attempt_timeout=0.3, deadline=5.0)
    transport = LeaderAwareTransport(endpoints, cache=cache, policy=policy)
    async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as http:
        with pytest.raises(LeaderUnavailable) as caught:
            await http.post("/tickets", content=b"one")
    assert caught.value.reason == "outcome_unknown"
    (record,) = caught.value.attempts
    assert isinstance(record.outcome, TimedOut)
    assert record.outcome.sent
    # The socket's read timeout (capped below the attempt's) or the attempt's own bound.
    assert "ReadTimeout" in record.outcome.error or "no response within" in record.outcome.error


@pytest.fixture
def stalling() -> Iterator[str]:
    """A node that answers a reply head (200, 40-byte body, epoch 12), 9 bytes, then stalls."""
    sock = _listening_socket()
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                connection, _ = sock.accept()
            except TimeoutError:
                continue
            held.append(connection)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                request += chunk
            connection.sendall(
                b'HTTP/1.1 200 OK\r\ncontent-length: 40\r\nleader-epoch: 12\r\n\r\n{"node": '
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield _endpoint(sock)
    finally:
        stop.set()
        thread.join(10)
        for connection in held:
            connection.close()
        sock.close()


async def test_loopback_a_reply_frozen_mid_body_costs_one_attempt(
    loopback: Loopback, stalling: str
) -> None:
    # httpx's own transport: the attempt's time caps each read, the body's included.
    endpoints = [stalling, loopback.leader]
    policy = RetryPolicy(attempt_timeout=0.3, deadline=5.0)
    cache = LeaderCache(endpoints, rng=random.Random(seed_starting_at(stalling, endpoints)))
    transport = LeaderAwareTransport(endpoints, cache=cache, policy=policy)
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as http:
        response = await http.get("/x")
        cache.record_success(stalling, 13)  # point the next request at the stalling node
        with pytest.raises(LeaderUnavailable) as caught:
            await http.post("/tickets", content=b"one")
    assert 0.3 <= time.monotonic() - started < 3.0
    assert response.json()["host"] == loopback.leader
    assert caught.value.reason == "outcome_unknown"
    (record,) = caught.value.attempts
    assert isinstance(record.outcome, TimedOut)
    assert record.outcome.sent
    assert "ReadTimeout" in record.outcome.error

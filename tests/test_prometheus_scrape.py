"""Scraping running services over HTTP: prometheus_client's own server, a real httpx client.

Two LeaderNode services (LocalElectionDriver on one directory, uvicorn on
loopback, LeaderRedirectMiddleware) and one etcd-driven node run in this
process; prometheus_client's ``start_http_server`` exposes ``/metrics`` from
its own thread, and the test reads it the way Prometheus does while the story
unfolds. uvicorn and grpc.aio run on asyncio only, so this module does too.
"""

from __future__ import annotations

import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn
from anyio.abc import TaskGroup
from etcd_server import EtcdServer
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from leaderwatch import LeaderNode, LocalElectionDriver
from leaderwatch.asgi import LeaderRedirectMiddleware
from leaderwatch.drivers.etcd import EtcdElectionDriver
from leaderwatch.httpx import LeaderAwareTransport
from leaderwatch.prometheus import collector

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop_per_module() -> None:
    """Run every test of this module in one event loop (grpc.aio binds to the first one)."""


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """prometheus_client's HTTP server on a free loopback port, scraping from its own thread."""
    registry = CollectorRegistry()
    registry.register(collector())
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


async def scrape(http: httpx.AsyncClient, url: str) -> Samples:
    response = await http.get(url)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape_until(
    http: httpx.AsyncClient, url: str, condition: Callable[[Samples], bool], what: str
) -> Samples:
    """Scrape until ``condition`` holds (deadline 10 s); fail naming ``what``."""
    deadline = time.monotonic() + 10.0
    while True:
        samples = await scrape(http, url)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"within 10 s, the scrape never showed: {what}")
        await anyio.sleep(0.01)


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def service(node: LeaderNode) -> Starlette:
    """A leader-only service: ``POST /work`` answers with the epoch it was admitted at."""

    async def work(request: Request) -> JSONResponse:
        return JSONResponse({"epoch": request.state.leader_epoch})

    return Starlette(
        routes=[Route("/work", work, methods=["POST"])],
        middleware=[Middleware(LeaderRedirectMiddleware, node=node)],
    )


@asynccontextmanager
async def serving(tasks: TaskGroup, app: Starlette, sock: socket.socket) -> AsyncIterator[None]:
    """uvicorn serving ``app`` on ``sock`` in this event loop, stopped on exit."""
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    tasks.start_soon(lambda: server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10.0
        while not server.started:
            if time.monotonic() > deadline:
                pytest.fail("uvicorn did not start on loopback within 10 s")
            await anyio.sleep(0.005)
        yield
    finally:
        server.should_exit = True


async def test_scraped_metrics_follow_election_requests_redirects_and_hand_over(
    tmp_path: Path, metrics_url: str
) -> None:
    socks = [listening_socket() for _ in range(2)]
    try:
        await _the_story(tmp_path, metrics_url, socks)
    finally:
        for sock in socks:
            sock.close()


async def _the_story(tmp_path: Path, metrics_url: str, socks: list[socket.socket]) -> None:
    a, b = (f"127.0.0.1:{sock.getsockname()[1]}" for sock in socks)
    election = tmp_path / "election"
    node_a = LeaderNode(LocalElectionDriver(election, node_endpoint=a, poll_interval=0.01))
    node_b = LeaderNode(LocalElectionDriver(election, node_endpoint=b, poll_interval=0.01))
    url = metrics_url

    async with (
        httpx.AsyncClient(timeout=10) as http,
        anyio.create_task_group() as tasks,
        serving(tasks, service(node_a), socks[0]),
        serving(tasks, service(node_b), socks[1]),
    ):
        # Built, not running: reported, leaderless, not serving.
        idle = await scrape(http, url)
        for node in (a, b):
            assert value(idle, "leaderwatch_role", node=node, role="unknown") == 1
            assert value(idle, "leaderwatch_node_serving", node=node) == 0

        async with node_a:
            # A wins the election: role and epoch gauges, the gate, the fence.
            lead = await scrape_until(
                http,
                url,
                lambda s: value(s, "leaderwatch_node_serving", node=a) == 1,
                f"{a} serving",
            )
            first_epoch = value(lead, "leaderwatch_epoch", node=a)
            assert first_epoch is not None
            assert first_epoch >= 1
            assert value(lead, "leaderwatch_role", node=a, role="leader") == 1
            assert value(lead, "leaderwatch_task_gate_serving", node=a) == 1
            assert value(lead, "leaderwatch_fence_latency_seconds_count", node=a) == 1
            assert value(lead, "leaderwatch_lease_proof_remaining_seconds", node=a) == math.inf
            info = {"driver": "LocalElectionDriver", "backend_endpoint": ""}
            assert value(lead, "leaderwatch_driver_info", node=a, **info) == 1

            async with node_b:
                await scrape_until(
                    http,
                    url,
                    lambda s: (
                        value(s, "leaderwatch_role", node=b, role="follower") == 1
                        and value(s, "leaderwatch_epoch", node=b) == first_epoch
                    ),
                    f"{b} following {a} at epoch {first_epoch}",
                )

                # Requests served by the leader count as admitted.
                for _ in range(3):
                    served = await http.post(f"http://{a}/work")
                    assert served.json() == {"epoch": first_epoch}
                await scrape_until(
                    http,
                    url,
                    lambda s: (
                        value(s, "leaderwatch_node_admitted_total", node=a) == 3
                        and value(s, "leaderwatch_node_in_flight", node=a) == 0
                    ),
                    "3 requests admitted on the leader",
                )

                # A request to the follower is redirected: counted by reason.
                redirected = await http.post(f"http://{b}/work")
                assert redirected.status_code == 307
                assert redirected.headers["location"] == f"http://{a}/work"
                await scrape_until(
                    http,
                    url,
                    lambda s: (
                        value(
                            s, "leaderwatch_node_refused_total", node=b, reason="leader_elsewhere"
                        )
                        == 1
                    ),
                    "one redirect counted on the follower",
                )

                # A leader-aware client starting at the follower moves its cache to the leader.
                transport = LeaderAwareTransport([b, a])
                async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                    response = await client.post("/work")
                    assert response.json() == {"epoch": first_epoch}
                clients = await scrape(http, url)
                cluster = f"{b},{a}"
                assert value(clients, "leaderwatch_client_cached_epoch", client=cluster) == (
                    first_epoch
                )
                moves = value(clients, "leaderwatch_client_leader_moves_total", client=cluster)
                assert moves == 1

                # A steps down: its gate closes, it stops campaigning, B takes over.
                await node_a.step_down()
                handed_over = await scrape_until(
                    http,
                    url,
                    lambda s: (
                        value(s, "leaderwatch_node_serving", node=b) == 1
                        and value(s, "leaderwatch_role", node=a, role="follower") == 1
                    ),
                    f"{b} serving and {a} following it",
                )
                assert value(handed_over, "leaderwatch_node_serving", node=a) == 0
                assert value(handed_over, "leaderwatch_task_gate_serving", node=a) == 0
                assert value(handed_over, "leaderwatch_driver_campaigning", node=a) == 0
                assert value(handed_over, "leaderwatch_lease_proof_remaining_seconds", node=a) == 0
                assert value(handed_over, "leaderwatch_node_last_drain_seconds", node=a) is not None
                second_epoch = value(handed_over, "leaderwatch_epoch", node=b)
                assert second_epoch is not None
                assert second_epoch > first_epoch
                assert value(handed_over, "leaderwatch_role", node=b, role="leader") == 1
                assert value(handed_over, "leaderwatch_epoch", node=a) == second_epoch
                transitions = value(handed_over, "leaderwatch_transitions_total", node=a)
                assert transitions is not None
                assert transitions >= 3  # leader, then (unknown, ...) follower of B

                # The old leader now redirects to the new one.
                back = await http.post(f"http://{a}/work")
                assert back.status_code == 307
                assert back.headers["location"] == f"http://{b}/work"
                await scrape_until(
                    http,
                    url,
                    lambda s: (
                        value(
                            s, "leaderwatch_node_refused_total", node=a, reason="leader_elsewhere"
                        )
                        == 1
                    ),
                    "one redirect counted on the old leader",
                )


async def test_an_etcd_node_reports_the_member_in_use_and_its_lease_proof(
    etcd: EtcdServer, metrics_url: str
) -> None:
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    endpoint = "127.0.0.1:7301"
    driver = EtcdElectionDriver(
        etcd.endpoint, election=name, node_endpoint=endpoint, ttl=2, node_id=name
    )
    node = LeaderNode(driver)
    async with httpx.AsyncClient(timeout=10) as http, node:
        lead = await scrape_until(
            http,
            metrics_url,
            lambda s: value(s, "leaderwatch_node_serving", node=name) == 1,
            "the etcd node serving",
        )
        info = {"driver": "EtcdElectionDriver", "backend_endpoint": etcd.endpoint}
        assert value(lead, "leaderwatch_driver_info", node=name, **info) == 1
        remaining = value(lead, "leaderwatch_lease_proof_remaining_seconds", node=name)
        assert remaining is not None
        assert 0 < remaining <= 2  # bounded by the ttl, renewed by keep-alives
        assert value(lead, "leaderwatch_driver_reconnects_total", node=name) == 0
        await node.step_down()
        stepped_down = await scrape_until(
            http,
            metrics_url,
            lambda s: value(s, "leaderwatch_node_serving", node=name) == 0,
            "the etcd node not serving after its step-down",
        )
        assert value(stepped_down, "leaderwatch_lease_proof_remaining_seconds", node=name) == 0
        assert value(stepped_down, "leaderwatch_driver_campaigning", node=name) == 0

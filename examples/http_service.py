"""A leader-only HTTP service: three uvicorn nodes, a client that finds the leader, failovers.

Each node is a process running a FastAPI app behind ``LeaderRedirectMiddleware``,
with a ``LeaderNode`` over a ``LocalElectionDriver`` (the three share an
election directory), served by ``leaderwatch.uvicorn.serve`` so that SIGTERM
hands leadership over at once. ``POST /tickets`` issues tickets stamped with
the epoch that admitted the request (the fencing token), so tickets from a
newer leader always sort after the old leader's. The client is an
``httpx.AsyncClient`` with ``LeaderAwareTransport``: its requests reach the
leader wherever they land first. The leader is stopped gracefully (SIGTERM),
then its successor is killed outright (SIGKILL); the client carries on each
time at a higher epoch, without a failed request.

Run: ``python examples/http_service.py`` (a few seconds; needs
``pip install 'leaderwatch[http]' fastapi``). It starts its nodes itself
(``--node`` runs one) and stops them before it exits, even when killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import anyio
import httpx
from fastapi import FastAPI, Request

import leaderwatch.uvicorn
from leaderwatch import LeaderNode, LocalElectionDriver
from leaderwatch.asgi import LeaderRedirectMiddleware
from leaderwatch.hint import IDEMPOTENCY_KEY_HEADER
from leaderwatch.httpx import LeaderAwareTransport
from leaderwatch.retry import RetryPolicy

# --- one node -------------------------------------------------------------------------------


def tickets_app(node: LeaderNode, endpoint: str) -> FastAPI:
    """``POST /tickets``: the next ticket of this node, fenced by the epoch that admitted it."""
    app = FastAPI(lifespan=node.lifespan)
    app.add_middleware(LeaderRedirectMiddleware, node=node, exempt=("/healthz",))
    issued: dict[str, dict[str, object]] = {}  # by idempotency key: a re-sent request's ticket

    @app.post("/tickets")
    async def issue(request: Request) -> dict[str, object]:
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER) or f"unkeyed-{len(issued)}"
        if key not in issued:
            epoch = request.state.leader_epoch
            issued[key] = {"epoch": epoch, "number": len(issued) + 1, "node": endpoint}
        return issued[key]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def run_node(directory: str, port: int) -> None:
    endpoint = f"127.0.0.1:{port}"
    parent = os.getppid()

    def stop_when_orphaned() -> None:  # the example was killed outright: stop too
        while os.getppid() == parent:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    node = LeaderNode(LocalElectionDriver(directory, node_endpoint=endpoint, poll_interval=0.02))
    app = tickets_app(node, endpoint)
    leaderwatch.uvicorn.serve(app, node=node, host="127.0.0.1", port=port, log_level="warning")


# --- the example ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_nodes(directory: str, count: int) -> dict[str, subprocess.Popen[bytes]]:
    nodes = {}
    for _ in range(count):
        port = free_port()
        argv = [sys.executable, __file__, "--node", "--directory", directory, "--port", str(port)]
        nodes[f"127.0.0.1:{port}"] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    for endpoint, process in nodes.items():
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {endpoint} did not start (exit {process.poll()})")
            try:
                if httpx.get(f"http://{endpoint}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
    return nodes


async def issue(client: httpx.AsyncClient, count: int) -> list[dict[str, object]]:
    tickets = []
    for _ in range(count):
        response = await client.post("/tickets")
        response.raise_for_status()
        ticket = response.json()
        print("ticket:", ticket)
        tickets.append(ticket)
    return tickets


async def main(nodes: dict[str, subprocess.Popen[bytes]]) -> None:
    transport = LeaderAwareTransport(
        list(nodes),
        policy=RetryPolicy(deadline=10.0, attempt_timeout=1.0),
        idempotency_keys=True,  # POSTs may be re-sent safely: the service deduplicates
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://tickets") as client:
        tickets = await issue(client, 3)
        leader = str(tickets[-1]["node"])
        print(f"leader {leader} hands over (SIGTERM)")
        nodes[leader].send_signal(signal.SIGTERM)
        tickets += await issue(client, 3)
        successor = str(tickets[-1]["node"])
        print(f"successor {successor} serves at epoch {tickets[-1]['epoch']}")
        print(f"leader {successor} is killed (SIGKILL)")
        nodes[successor].kill()
        tickets += await issue(client, 3)
        last = str(tickets[-1]["node"])
        print(f"successor {last} serves at epoch {tickets[-1]['epoch']}")
    assert len({leader, successor, last}) == 3
    order = [(ticket["epoch"], ticket["number"]) for ticket in tickets]
    assert order == sorted(order), order  # fenced tickets never go backwards
    assert nodes[leader].wait(10) == 0  # the graceful stop exits cleanly


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", action="store_true", help="run one node (used by the example)")
    parser.add_argument("--directory", help="election directory of the node")
    parser.add_argument("--port", type=int, help="port of the node")
    args = parser.parse_args()
    if args.node:
        run_node(args.directory, args.port)
        sys.exit(0)
    with tempfile.TemporaryDirectory() as election:
        started = start_nodes(election, 3)
        print("nodes:", ", ".join(f"{e} (pid {p.pid})" for e, p in started.items()))
        try:
            anyio.run(main, started)
        finally:
            for process in started.values():
                if process.poll() is None:
                    process.terminate()
            for process in started.values():
                process.wait(10)

"""A leader-only gRPC service: three nodes, a client that finds the leader, a failover.

Each node is a ``LeaderNode`` over a ``LocalElectionDriver`` (the three share
an election directory) behind a ``grpc.aio`` server with
``LeaderInterceptor``. The service issues tickets stamped with the admitted
epoch (``current_epoch()``, the fencing token), so tickets from a newer
leader always sort after the old leader's. The client is a
``LeaderChannelPool``: its calls reach the leader wherever they land first.
Then the leader hands over gracefully, as it would on SIGTERM, and the client
carries on with its successor at a higher epoch.

Run: ``python examples/grpc_service.py`` (a few seconds).
"""

from __future__ import annotations

import json
import socket
import tempfile
from typing import Any

import anyio
import grpc
import grpc.aio
from anyio.abc import TaskStatus

from leaderwatch import LeaderNode, LocalElectionDriver
from leaderwatch.grpc import LeaderChannelPool, LeaderInterceptor, current_epoch, hand_over

SERVICE = "tickets.v1.Tickets"


def tickets_service(endpoint: str) -> grpc.GenericRpcHandler:
    """``Issue``: the next ticket of this node, fenced by the epoch it was admitted at."""
    issued = 0

    async def issue(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        nonlocal issued
        issued += 1
        ticket = {"epoch": current_epoch(), "number": issued, "node": endpoint}
        return json.dumps(ticket).encode()

    return grpc.method_handlers_generic_handler(
        SERVICE, {"Issue": grpc.unary_unary_rpc_method_handler(issue)}
    )


class TicketsStub:
    """What protoc generates for the service (any generated stub works the same)."""

    def __init__(self, channel: Any) -> None:
        self.Issue = channel.unary_unary(
            f"/{SERVICE}/Issue", request_serializer=bytes, response_deserializer=json.loads
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_node(
    directory: str, stop: anyio.Event, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    node = LeaderNode(LocalElectionDriver(directory, node_endpoint=endpoint, poll_interval=0.01))
    server = grpc.aio.server(interceptors=[LeaderInterceptor(node)])
    server.add_generic_rpc_handlers([tickets_service(endpoint)])
    server.add_insecure_port(endpoint)
    async with node:
        await server.start()
        task_status.started(endpoint)
        await stop.wait()
        # What a SIGTERM handler does: step down (admitted calls finish), point
        # clients at the successor, then stop the server.
        await hand_over(node, server, grace=1.0)


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        stops = [anyio.Event() for _ in range(3)]
        async with anyio.create_task_group() as nodes:
            endpoints = [await nodes.start(run_node, directory, stop) for stop in stops]
            print("nodes:", ", ".join(endpoints))
            async with LeaderChannelPool(endpoints) as pool:
                tickets = pool.stub(TicketsStub)
                issued = [await tickets.Issue(b"", timeout=5) for _ in range(3)]
                leader = issued[-1]["node"]
                for ticket in issued:
                    print("ticket:", ticket)
                print(f"leader {leader} hands over")
                stops[endpoints.index(leader)].set()
                after = [await tickets.Issue(b"", timeout=5) for _ in range(3)]
                for ticket in after:
                    print("ticket:", ticket)
                successor = after[-1]
                assert successor["node"] != leader
                assert successor["epoch"] > issued[-1]["epoch"]
                order = [(t["epoch"], t["number"]) for t in issued + after]
                assert order == sorted(order), order  # fenced tickets never go backwards
                print(f"successor {successor['node']} serves at epoch {successor['epoch']}")
            for stop in stops:
                stop.set()


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")  # grpc.aio runs on asyncio

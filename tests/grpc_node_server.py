"""One node of a leader-only gRPC service, in its own process (cluster tests and benchmark).

    python tests/grpc_node_server.py --directory D --port P [--events F] [--drain S]
        [--tls-cert C --tls-key K] [--no-interceptor] [--tsoracle-compatible]

A ``LeaderNode`` over ``LocalElectionDriver`` (election directory ``D``)
behind a ``grpc.aio`` server on ``127.0.0.1:P`` with ``LeaderInterceptor``,
serving the ``Ticket`` test service (tests/grpc_service.py) and the standard
health service. Prints ``{"ready": "127.0.0.1:P", "pid": ...}`` on stdout
once serving. On SIGTERM or SIGINT it hands over gracefully: the node steps
down (admitted calls drain first, then it resigns and keeps redirecting),
then the server stops; exit status 0. ``--events F`` appends one JSON line
per call to ``F`` (``time.monotonic()`` stamps, one clock for every process
of a Linux host). ``--no-interceptor`` serves every call on every node
(the benchmark's baseline).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import anyio
import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_service import ticket_handler  # this file's directory is on sys.path

from leaderwatch import LeaderNode, LocalElectionDriver
from leaderwatch.grpc import LeaderInterceptor, hand_over


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--directory", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events")
    parser.add_argument("--drain", type=float, default=5.0)
    parser.add_argument("--poll", type=float, default=0.01)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--no-interceptor", action="store_true")
    parser.add_argument("--tsoracle-compatible", action="store_true")
    return parser.parse_args()


async def serve(args: argparse.Namespace) -> None:
    endpoint = f"127.0.0.1:{args.port}"
    events = (
        os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if args.events else None
    )

    def record(kind: str, **fields: Any) -> None:
        if events is not None:  # one write on an O_APPEND file: lines never interleave
            os.write(
                events, (json.dumps({"kind": kind, "node": endpoint, **fields}) + "\n").encode()
            )

    node = LeaderNode(
        LocalElectionDriver(args.directory, node_endpoint=endpoint, poll_interval=args.poll),
        drain_timeout=args.drain,
    )
    interceptors = (
        []
        if args.no_interceptor
        else [LeaderInterceptor(node, tsoracle_compatible=args.tsoracle_compatible)]
    )
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers([ticket_handler(endpoint, record)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if args.tls_cert:
        key = await anyio.Path(args.tls_key).read_bytes()
        cert = await anyio.Path(args.tls_cert).read_bytes()
        server.add_secure_port(endpoint, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(endpoint)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with node:
            await server.start()
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            print(json.dumps({"ready": endpoint, "pid": os.getpid()}), flush=True)
            async for _ in signals:
                break
            record("stepping_down", t=time.monotonic())
            # Drain admitted calls, resign, redirect to the successor, then stop the server.
            await hand_over(node, server, grace=1.0)
            record("stopped", t=time.monotonic())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    anyio.run(serve, arguments(), backend="asyncio")


if __name__ == "__main__":
    main()

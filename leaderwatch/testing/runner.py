"""Run one election node as a process and report each leadership transition as a JSON line.

``python -m leaderwatch.testing.runner local --directory D --endpoint host:port``
``python -m leaderwatch.testing.runner etcd --endpoints H:P[,H:P] --election NAME [--endpoint H:P]``
``python -m leaderwatch.testing.runner postgres --dsn URI --election NAME [--endpoint H:P]``

Options before the subcommand: ``--backend asyncio|trio`` (anyio backend;
etcd and postgres need asyncio) and ``--log-level debug|info|warning|error``.
Every subcommand takes ``--node-id ID`` (the name in output and logs;
default: the driver's, usually its endpoint).

Stdout carries only JSON lines, one per transition, each flushed::

    {"node": ID, "pid": PID, "t": MONOTONIC_S, "wall": UNIX_S, "state": {...}}

``state`` is the ``LeaderState`` as JSON (``{"kind": "leader", "epoch": 3}``,
``{"kind": "follower", "leader_endpoint": "h:p", "leader_epoch": 3}``,
``{"kind": "unknown"}``); the first line is the value at start-up. ``t`` is
``time.monotonic()``, which on Linux is one clock for every process of the
host, so other processes can compare it with their own readings and
:meth:`leaderwatch.testing.LeadershipHistory.feed_json_line` can merge the
lines of many nodes. Like any subscriber the runner skips a value replaced
before it was printed. Logs go to stderr as JSON lines. SIGTERM or SIGINT
makes the node resign and exit 0; the last line then carries ``Unknown``.
Exit status 1 (and ``error: ...`` on stderr) when the driver fails.

Backends are subcommands: each is a :class:`NodeBackend` in ``BACKENDS``.
To run your own driver in the same harness, register it and call
:func:`main` from a script of your own::

    import sys
    from leaderwatch.testing.runner import BACKENDS, NodeBackend, main
    from mypackage import MyDriver

    def add_arguments(parser):
        parser.add_argument("--endpoint", required=True)

    def open_driver(args, node_id):
        return MyDriver(node_endpoint=args.endpoint, node_id=node_id)

    BACKENDS.append(NodeBackend("mine", "my election", add_arguments, open_driver))
    sys.exit(main())  # python my_runner.py mine --endpoint 127.0.0.1:7001
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import anyio

from leaderwatch.cli import configure_logging
from leaderwatch.drivers._base import DriverBase
from leaderwatch.drivers.local import LocalElectionDriver

__all__ = ["BACKENDS", "NodeBackend", "main"]


@dataclass(frozen=True)
class NodeBackend:
    """A subcommand of the runner: its arguments and how to build its driver.

    ``add_arguments`` receives the subcommand's parser (``--node-id`` is
    already there); ``open_driver`` receives the parsed arguments and the
    node id, and returns a driver not yet entered. Import optional client
    libraries inside ``open_driver`` so other backends run without them.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    open_driver: Callable[[argparse.Namespace, str | None], DriverBase]


def _local_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--directory", required=True, help="election directory shared by the nodes")
    parser.add_argument("--endpoint", required=True, help="host:port this node advertises")
    parser.add_argument(
        "--poll-interval", type=float, default=0.05, help="seconds between lock tries"
    )


def _local_driver(args: argparse.Namespace, node_id: str | None) -> DriverBase:
    return LocalElectionDriver(
        args.directory,
        node_endpoint=args.endpoint,
        poll_interval=args.poll_interval,
        node_id=node_id,
    )


def _etcd_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoints", required=True, help="etcd host:port list, comma-separated, tried in order"
    )
    parser.add_argument("--election", required=True, help="election name (key prefix)")
    parser.add_argument(
        "--endpoint", default=None, help="host:port this node advertises; omit to only observe"
    )
    parser.add_argument("--ttl", type=int, default=10, help="lease time-to-live in seconds")
    parser.add_argument(
        "--margin", type=float, default=None, help="step down this long before ttl (seconds)"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=5.0, help="start-up connection deadline (s)"
    )


def _etcd_driver(args: argparse.Namespace, node_id: str | None) -> DriverBase:
    from leaderwatch.drivers.etcd import EtcdElectionDriver

    return EtcdElectionDriver(
        args.endpoints,
        election=args.election,
        node_endpoint=args.endpoint,
        ttl=args.ttl,
        margin=args.margin,
        connect_timeout=args.connect_timeout,
        node_id=node_id,
    )


def _postgres_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn", required=True, help="postgresql://user:password@host:port/database"
    )
    parser.add_argument("--election", required=True, help="election name (the row's key)")
    parser.add_argument(
        "--endpoint", default=None, help="host:port this node advertises; omit to only observe"
    )
    parser.add_argument("--ttl", type=int, default=10, help="lease time-to-live in seconds")
    parser.add_argument(
        "--margin", type=float, default=None, help="step down this long before ttl (seconds)"
    )
    parser.add_argument(
        "--schema", default="leaderwatch", help="schema of the elections table (and channel)"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=5.0, help="start-up connection deadline (s)"
    )


def _postgres_driver(args: argparse.Namespace, node_id: str | None) -> DriverBase:
    from leaderwatch.drivers.postgres import PostgresElectionDriver

    return PostgresElectionDriver(
        args.dsn,
        election=args.election,
        node_endpoint=args.endpoint,
        ttl=args.ttl,
        margin=args.margin,
        schema=args.schema,
        connect_timeout=args.connect_timeout,
        node_id=node_id,
    )


BACKENDS: list[NodeBackend] = [
    NodeBackend("local", "file-lock election on this host", _local_arguments, _local_driver),
    NodeBackend(
        "etcd",
        "election on an etcd v3 cluster (needs the etcd extra; asyncio backend only)",
        _etcd_arguments,
        _etcd_driver,
    ),
    NodeBackend(
        "postgres",
        "election on a PostgreSQL table (needs the postgres extra; asyncio backend only)",
        _postgres_arguments,
        _postgres_driver,
    ),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m leaderwatch.testing.runner",
        description="Campaign in an election and print one JSON line per leadership transition.",
    )
    parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="anyio backend"
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="library log events at this level and above go to stderr as JSON lines",
    )
    commands = parser.add_subparsers(dest="driver", required=True, metavar="DRIVER")
    for backend in BACKENDS:
        command = commands.add_parser(backend.name, help=backend.help)
        command.add_argument("--node-id", default=None, help="name used in logs and output")
        backend.add_arguments(command)
        command.set_defaults(open_driver=backend.open_driver)
    return parser


def _emit(out: TextIO, node: str, state: dict[str, object]) -> None:
    line = {
        "node": node,
        "pid": os.getpid(),
        "t": time.monotonic(),
        "wall": time.time(),
        "state": state,
    }
    out.write(json.dumps(line, separators=(",", ":")) + "\n")
    out.flush()


async def _run(driver: DriverBase, out: TextIO) -> None:
    receiver = driver.leadership()

    async def report() -> None:
        # Ends once the driver exited and its last value (Unknown) was written.
        async for state in receiver:
            _emit(out, driver.node_id, state.model_dump(mode="json"))

    # Handle signals before the driver can win: a node that reported Leader resigns on SIGTERM.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(report)
            async with driver:
                async for _ in signals:
                    break


def _errors(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _errors(inner)]
    return [error]


def main(argv: Sequence[str] | None = None) -> int:
    """Run a node until SIGTERM/SIGINT; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(logging.getLevelNamesMapping()[args.log_level.upper()], json_lines=True)
    driver: DriverBase = args.open_driver(args, args.node_id)
    try:
        anyio.run(_run, driver, sys.stdout, backend=args.backend)
    except Exception as error:
        leaves = _errors(error)
        if all(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            return 0
        for leaf in leaves:
            print(f"error: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

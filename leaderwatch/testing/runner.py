"""Run one node of your own driver as a process, printing what ``leaderwatch campaign`` prints.

The built-in drivers need no harness: ``leaderwatch campaign URL --endpoint
HOST:PORT --format json`` runs one node of any election URL
(``local:///D``, ``etcd://H:P/NAME?ttl=2``, ``postgres://.../db?election=NAME``)
and is the process runner of leaderwatch's own multi-process tests and
benchmarks. This module runs a driver of yours in the same loop, so its
lines, signals and exit statuses are the same.

Register each driver as a :class:`NodeBackend` in ``BACKENDS`` (it becomes
a subcommand) and call :func:`main` from a script of your own::

    import sys
    from leaderwatch.testing.runner import BACKENDS, NodeBackend, main
    from mypackage import MyDriver

    def add_arguments(parser):
        parser.add_argument("--endpoint", required=True)

    def open_driver(args, node_id):
        return MyDriver(node_endpoint=args.endpoint, node_id=node_id)

    BACKENDS.append(NodeBackend("mine", "my election", add_arguments, open_driver))
    sys.exit(main())  # python my_runner.py mine --endpoint 127.0.0.1:7001

Options before the subcommand: ``--backend asyncio|trio`` (anyio backend)
and ``--log-level debug|info|warning|error``. Every subcommand takes
``--node-id ID`` (the name in output and logs; default: the driver's).

Stdout carries only JSON lines, one per transition, each flushed::

    {"node": ID, "pid": PID, "t": MONOTONIC_S, "wall": UNIX_S, "state": {...}}

``state`` is the ``LeaderState`` as JSON (``{"kind": "leader", "epoch": 3}``,
``{"kind": "follower", "leader_endpoint": "h:p", "leader_epoch": 3}``,
``{"kind": "unknown"}``); the first line is the state once the driver has
started. ``t`` is ``time.monotonic()``, which on Linux is one clock for
every process of the host, so other processes can compare it with their
own readings and :meth:`leaderwatch.testing.LeadershipHistory.feed_json_line`
can merge the lines of many nodes. Like any subscriber the runner skips a
value replaced before it was printed. Logs go to stderr as JSON lines.
SIGTERM or SIGINT makes the node resign and exit 0; the last line then
carries ``Unknown``. Exit status 1 (and ``error: ...`` on stderr) when the
driver fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from leaderwatch._transitions import TransitionPrinter, error_leaves, print_transitions
from leaderwatch.cli import configure_logging
from leaderwatch.drivers._base import DriverBase

__all__ = ["BACKENDS", "NodeBackend", "main"]

_BUILT_IN: dict[str, str] = {
    "local": "leaderwatch campaign local:///DIR?poll_interval=0.05 --endpoint H:P --format json",
    "etcd": "leaderwatch campaign etcd://H:P[,H:P]/NAME?ttl=10 --endpoint H:P --format json",
    "postgres": (
        "leaderwatch campaign 'postgres://USER@H:P/DB?election=NAME&ttl=10' "
        "--endpoint H:P --format json"
    ),
}


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


BACKENDS: list[NodeBackend] = []
"""Your drivers, one subcommand each; empty until you register one."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=None if BACKENDS else "python -m leaderwatch.testing.runner",
        description="Campaign in an election and print one JSON line per leadership transition.",
        epilog="Built-in drivers: leaderwatch campaign URL --endpoint HOST:PORT --format json.",
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


def _unregistered(argv: Sequence[str]) -> str | None:
    """Why ``argv`` names no registered driver, if it names a built-in one or none is known."""
    registered = {backend.name for backend in BACKENDS}
    named = _subcommand(argv)
    if named in _BUILT_IN and named not in registered:
        return (
            f"the {named} driver runs under the leaderwatch command, not this harness: "
            f"{_BUILT_IN[named]}"
        )
    if not registered and not {"-h", "--help"} & set(argv):
        return (
            "no driver registered: append a NodeBackend to BACKENDS and call main() from a "
            "script of your own (see leaderwatch.testing.runner); built-in drivers run under "
            "leaderwatch campaign URL --endpoint HOST:PORT --format json"
        )
    return None


def _subcommand(argv: Sequence[str]) -> str | None:
    arguments = iter(argv)
    for arg in arguments:
        if arg in ("--backend", "--log-level"):
            next(arguments, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run a node of a registered driver until SIGTERM/SIGINT; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    problem = _unregistered(arguments)
    if problem is not None:
        parser.print_usage(sys.stderr)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args = parser.parse_args(arguments)
    configure_logging(logging.getLevelNamesMapping()[args.log_level.upper()], json_lines=True)
    driver: DriverBase = args.open_driver(args, args.node_id)
    printer = TransitionPrinter("json", observer=False, stream=sys.stdout)
    try:
        anyio.run(print_transitions, driver, printer, backend=args.backend)
    except Exception as error:
        leaves = error_leaves(error)
        if all(isinstance(leaf, BrokenPipeError) for leaf in leaves):
            return 0
        for leaf in leaves:
            print(f"error: {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``leaderwatch`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import anyio

from leaderwatch._demo import run_demo
from leaderwatch.logs import JSONFormatter

__all__ = ["main"]


def configure_logging(level: int, *, json_lines: bool = False) -> None:
    """Send leaderwatch's log events at ``level`` and above to stderr (applications only).

    The CLI is an application, so it may configure logging; the library never does.
    """
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("leaderwatch")
    logger.addHandler(handler)
    logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``leaderwatch`` command; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="leaderwatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="three local nodes elect a leader, fail over, and redirect a client"
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="show the library's info logs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        configure_logging(logging.INFO if args.verbose else logging.ERROR)
        anyio.run(run_demo)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

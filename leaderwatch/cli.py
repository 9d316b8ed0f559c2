"""The ``leaderwatch`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import anyio
import structlog

from leaderwatch._demo import run_demo

__all__ = ["main"]


def _configure_logging(verbose: bool) -> None:
    # The CLI is an application: it may configure logging; the library never does.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.INFO if verbose else logging.ERROR
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


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
        _configure_logging(args.verbose)
        anyio.run(run_demo)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``leaderwatch`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from leaderwatch.channel import WatchReceiver
from leaderwatch.state import Follower, Leader, Unknown
from leaderwatch.watch import LeaderWatch

__all__ = ["main"]

_DEMO_SCRIPT: tuple[Leader | Follower | Unknown, ...] = (
    Follower(leader_endpoint="10.0.0.7:50551", leader_epoch=6),
    Follower(leader_endpoint="10.0.0.7:50551", leader_epoch=6),
    Unknown(),
    Leader(epoch=7),
    Leader(epoch=8),
    Follower(leader_endpoint="10.0.0.9:50551", leader_epoch=9),
)


def _show(state: Leader | Follower | Unknown) -> str:
    match state:
        case Leader(epoch=epoch):
            return f"Leader(epoch={epoch})"
        case Follower(leader_endpoint=endpoint, leader_epoch=epoch):
            return f"Follower(leader_endpoint={endpoint!r}, leader_epoch={epoch})"
        case _:
            return "Unknown()"


async def _subscriber(
    name: str, receiver: WatchReceiver[Leader | Follower | Unknown], out: list[str]
) -> None:
    async for state in receiver:
        out.append(f"{name} sees {_show(state)}")


async def _demo() -> int:
    lines: list[str] = []
    watch = LeaderWatch("demo-node")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_subscriber, "subscriber-1", watch.subscribe(), lines)
        tg.start_soon(_subscriber, "subscriber-2", watch.subscribe(), lines)
        await anyio.wait_all_tasks_blocked()
        for state in _DEMO_SCRIPT:
            delivered = watch.publish(state)
            lines.append(f"publish {_show(state)} -> {'delivered' if delivered else 'suppressed'}")
            await anyio.wait_all_tasks_blocked()
        watch.close()
    for line in lines:
        print(line)
    stats = watch.stats
    print(
        f"delivered={stats.delivered} suppressed={stats.suppressed} regressions={stats.regressions}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``leaderwatch`` command; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="leaderwatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("demo", help="publish a few transitions to two subscribers")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return anyio.run(_demo)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

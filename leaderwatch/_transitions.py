"""Run one election node and print each leadership transition: one loop for every runner.

``leaderwatch campaign`` / ``observe`` and :mod:`leaderwatch.testing.runner`
(the harness for a user's own driver) both run :func:`print_transitions`,
so they print the same lines and stop the same way.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import anyio

from leaderwatch._log import get_logger
from leaderwatch.channel import WatchReceiver
from leaderwatch.drivers._base import DriverBase
from leaderwatch.state import Follower, Leader, LeaderState

__all__ = ["TransitionPrinter", "error_leaves", "json_line", "print_transitions"]

# Its events belong to the command line (leaderwatch campaign/observe and the runner harness).
_log = get_logger("leaderwatch.cli")


def json_line(node: str, state: LeaderState) -> str:
    """One report ``{"node", "pid", "t", "wall", "state"}``; ``t`` is ``time.monotonic()``."""
    return json.dumps(
        {
            "node": node,
            "pid": os.getpid(),
            "t": time.monotonic(),
            "wall": time.time(),
            "state": state.model_dump(mode="json"),
        },
        separators=(",", ":"),
    )


@dataclass
class TransitionPrinter:
    """Writes one flushed line per leadership value: text for people, or :func:`json_line`."""

    output: str
    observer: bool
    stream: TextIO
    stopping: bool = False

    def emit(self, node: str, state: LeaderState, *, timestamp: bool = True) -> None:
        if self.output == "json":
            line = json_line(node, state)
        else:
            line = self.describe(state)
            if timestamp:
                line = f"{datetime.now().strftime('%H:%M:%S.%f')[:-3]}  {line}"
        self.stream.write(line + "\n")
        self.stream.flush()

    def describe(self, state: LeaderState) -> str:
        match state:
            case Leader(epoch=epoch):
                return f"leading at epoch {epoch}"
            case Follower(leader_endpoint=None, leader_epoch=None):
                pass
            case Follower(leader_endpoint=endpoint, leader_epoch=epoch):
                who = endpoint if endpoint is not None else "(endpoint unknown)"
                at = f"at epoch {epoch}" if epoch is not None else "(epoch unknown)"
                return f"leader {who} {at}" if self.observer else f"following {who} {at}"
        if self.stopping and not self.observer:
            return "resigned; left the election"
        return "no leader known"


async def _report(
    receiver: WatchReceiver[LeaderState], node: str, printer: TransitionPrinter
) -> None:
    async for state in receiver:
        printer.emit(node, state)


async def print_transitions(driver: DriverBase, printer: TransitionPrinter) -> None:
    """Run ``driver`` (not yet entered) and print its transitions until SIGINT or SIGTERM.

    The first line is the state once the driver has started; like any
    subscriber it skips a value replaced before it was printed. On the
    signal a candidate resigns and its last line is its final state
    (``Unknown``); an observer prints nothing more. Signals are handled
    before the driver can win, so a node that led always resigns.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as task_group:
            reporting = anyio.CancelScope()

            async def report(receiver: WatchReceiver[LeaderState]) -> None:
                with reporting:
                    await _report(receiver, driver.node_id, printer)

            async with driver:
                task_group.start_soon(report, driver.leadership())
                async for signum in signals:
                    _log.info(
                        "cli_stopping", node_id=driver.node_id, signal=signal.Signals(signum).name
                    )
                    break
                printer.stopping = True
                if printer.observer:
                    # An observer's exit is no news about the election: print nothing more.
                    reporting.cancel()
            # A candidate's report ends after its last value (it resigned), then the group exits.


def error_leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, exception groups flattened."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in error_leaves(inner)]
    return [error]

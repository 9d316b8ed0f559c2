"""One node process of ``leaderwatch demo``: a fenced ticket desk behind the redirect middleware.

``python -m leaderwatch._demo_node --directory D --port P [--name NAME] [--parent PID]``
runs a :class:`~leaderwatch.node.LeaderNode` on :class:`LocalElectionDriver`
in ``D`` and serves, through :func:`leaderwatch.uvicorn.serve` (hand-over
starts at the first SIGTERM/SIGINT), a pure ASGI app:

- ``POST /tickets`` (leader only, behind :class:`LeaderRedirectMiddleware`):
  the next ticket number, stamped with the epoch the middleware admitted the
  request at (``scope["state"]["leader_epoch"]``), appended to the ledger
  ``D/tickets.jsonl`` before the answer. A request carrying an
  ``Idempotency-Key`` it already answered gets the same ticket again.
- ``GET /leaderwatch/status`` and ``/leaderwatch/leader`` on every node
  (:func:`leader_status_app`).

The fence (``on_leader``) reads the ledger, so a new term numbers its tickets
after everything earlier terms wrote; a ticket is issued only at the epoch
that fence completed. The process exits by itself when its parent dies, so a
killed demo leaves no node behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import anyio

import leaderwatch.uvicorn
from leaderwatch.asgi import (
    ASGIApp,
    LeaderRedirectMiddleware,
    Receive,
    Scope,
    Send,
    leader_status_app,
)
from leaderwatch.cli import configure_logging
from leaderwatch.drivers.local import LocalElectionDriver
from leaderwatch.node import LeaderNode
from leaderwatch.serving import BaseLeadershipHandler

__all__ = ["LEDGER_FILE", "STATUS_PREFIX", "TICKETS_PATH", "TicketDesk", "build_app", "main"]

LEDGER_FILE: Final = "tickets.jsonl"
"""The ledger in the election directory: one JSON object per issued ticket."""
TICKETS_PATH: Final = "/tickets"
STATUS_PREFIX: Final = "/leaderwatch"

_HOST: Final = "127.0.0.1"
_POLL_INTERVAL: Final = 0.01
# Failover on one host takes milliseconds: tell clients to come back soon, not in 100 ms.
_RETRY_AFTER: Final = 0.01
_DRAIN_TIMEOUT: Final = 2.0
_ORPHAN_CHECK: Final = 0.2
_JSON: Final = (b"content-type", b"application/json")


class TicketDesk(BaseLeadershipHandler):
    """Issues numbered tickets, each stamped with the epoch whose fence read the whole ledger."""

    def __init__(self, ledger: Path, node_name: str) -> None:
        self._ledger = ledger
        self._node_name = node_name
        self._fenced_epoch: int | None = None
        self._next_ticket = 1
        self._answered: dict[str, dict[str, Any]] = {}
        self._fd: int | None = None

    async def on_leader(self, epoch: int) -> None:
        # The fence: every ticket earlier terms wrote is known before this term issues one.
        entries = []
        if self._ledger.exists():
            entries = [json.loads(line) for line in self._ledger.read_text().splitlines() if line]
        self._answered = {entry["key"]: entry for entry in entries if entry.get("key")}
        self._next_ticket = max((entry["ticket"] for entry in entries), default=0) + 1
        if self._fd is None:
            self._fd = os.open(self._ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fenced_epoch = epoch

    async def on_follower(self, leader_endpoint: str | None, leader_epoch: int | None) -> None:
        self._fenced_epoch = None

    async def on_unknown(self) -> None:
        self._fenced_epoch = None

    def issue(self, epoch: int, key: str | None) -> dict[str, Any] | None:
        """The ticket for this request at ``epoch``; ``None`` unless ``epoch`` is the fenced one."""
        if epoch != self._fenced_epoch or self._fd is None:
            return None
        if key is not None and key in self._answered:
            return {**self._answered[key], "repeated": True}
        entry = {"ticket": self._next_ticket, "epoch": epoch, "node": self._node_name, "key": key}
        # One write on an O_APPEND file: the line is on disk before the client hears of it.
        os.write(self._fd, (json.dumps(entry) + "\n").encode())
        self._next_ticket += 1
        if key is not None:
            self._answered[key] = entry
        return {**entry, "repeated": False}


def build_app(node: LeaderNode, desk: TicketDesk, parent: int) -> ASGIApp:
    """The node's ASGI app: tickets on the leader, redirects elsewhere, status everywhere.

    While it runs, the process stops itself (SIGTERM) once ``parent`` is no
    longer its parent process.
    """
    status = leader_status_app(node)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, parent)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path.startswith(STATUS_PREFIX + "/"):
            await status(scope, receive, send)
            return
        if path != TICKETS_PATH or scope["method"] != "POST":
            await _reply(send, 404, {"error": "not found: POST /tickets"})
            return
        while (await receive()).get("more_body"):
            pass
        epoch = scope["state"]["leader_epoch"]
        headers = dict(scope["headers"])
        key = headers.get(b"idempotency-key")
        ticket = desk.issue(epoch, None if key is None else key.decode("latin-1"))
        if ticket is None:
            await _reply(send, 500, {"error": f"not fenced at epoch {epoch}"})
            return
        await _reply(send, 200, ticket)

    return LeaderRedirectMiddleware(
        app, node=node, exempt=(STATUS_PREFIX,), retry_after=_RETRY_AFTER
    )


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [_JSON, (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive: Receive, send: Send, parent: int) -> None:
    await receive()  # lifespan.startup
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_stop_when_orphaned, parent)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        task_group.cancel_scope.cancel()
    await send({"type": "lifespan.shutdown.complete"})


async def _stop_when_orphaned(parent: int) -> None:
    # The demo may die without stopping its nodes (SIGKILL): then step down and exit.
    # Nothing announces a parent's death portably, so look now and then.
    while os.getppid() == parent:  # noqa: ASYNC110
        await anyio.sleep(_ORPHAN_CHECK)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one demo node until SIGTERM/SIGINT; the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m leaderwatch._demo_node")
    parser.add_argument("--directory", required=True, help="election directory")
    parser.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    parser.add_argument("--name", help="node name in the ledger [default: the endpoint]")
    parser.add_argument(
        "--parent", type=int, help="stop when this process dies [default: the parent now]"
    )
    parser.add_argument("--log-level", default="error", help="leaderwatch log level")
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    args = parser.parse_args(argv)

    level = logging.getLevelNamesMapping()[args.log_level.upper()]
    configure_logging(level, json_lines=args.log_format == "json")
    endpoint = f"{_HOST}:{args.port}"
    name = args.name or endpoint
    directory = Path(args.directory)
    desk = TicketDesk(directory / LEDGER_FILE, name)
    driver = LocalElectionDriver(
        directory, node_endpoint=endpoint, node_id=name, poll_interval=_POLL_INTERVAL
    )
    node = LeaderNode(driver, handler=desk, drain_timeout=_DRAIN_TIMEOUT)
    try:
        leaderwatch.uvicorn.serve(
            build_app(node, desk, args.parent or os.getppid()),
            node=node,
            host=_HOST,
            port=args.port,
            lifespan="on",
            access_log=False,
            log_level=max(level, logging.WARNING),
            timeout_graceful_shutdown=_DRAIN_TIMEOUT,
        )
    except Exception as error:
        print(f"{name}: node failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
